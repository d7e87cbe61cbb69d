"""MusicGen token generation: the contract shared by the reference (transformers) path and our fast decoder.

Both turn (text, optional melody chroma, optional prompt codes) into EnCodec codes, shape (B, K, T) with
K = 4 (mono) or 8 (stereo, left/right interleaved: [:, ::2] left, [:, 1::2] right), de-delayed, the prompt
codes included at the front. Audio decoding (EnCodec or Multi-Band Diffusion) happens after, in one place.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import torch

FRAME_RATE = 50  # EnCodec 32 kHz with hop 640


@dataclass
class Sampling:
    top_k: int = 250
    top_p: float = 0.0  # 0 = use top_k only, as Replicate's MusicGen
    temperature: float = 1.0
    guidance_scale: float = 3.0


@dataclass
class CodesRequest:
    input_ids: torch.Tensor  # (B, S) T5 tokens
    attention_mask: torch.Tensor  # (B, S)
    new_frames: int  # frames of audio to generate after the prompt
    sampling: Sampling
    prompt_codes: Optional[torch.Tensor] = None  # (B, K, T0) de-delayed codes to continue
    chroma: Optional[torch.Tensor] = None  # (B, T, 12) one-hot chroma (melody models only)
    on_step: Optional[Callable[[int, int], None]] = None  # (steps done, steps total); may raise to cancel


def decoding_steps(num_codebooks_per_channel: int, new_frames: int) -> int:
    """Tokens to sample for `new_frames` frames: the delay pattern adds K-1 steps."""
    return new_frames + num_codebooks_per_channel - 1


class _StepReporter:
    """A transformers StoppingCriteria that reports progress once per decoding step (never stops)."""

    def __init__(self, total: int, on_step):
        self.total, self.on_step, self.done = total, on_step, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.done += 1
        if self.on_step is not None:
            self.on_step(min(self.done, self.total), self.total)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@contextmanager
def _capture_codes(model):
    """transformers' generate() always decodes audio at the end; we want the codes. Swap the EnCodec
    decode for one that records them (and skips the wasted decode) for the duration of the call."""
    captured = []
    audio_encoder = model.audio_encoder
    original = audio_encoder.decode

    class _Out:
        def __init__(self, n):
            self.audio_values = torch.zeros(n, 1, 1)

    def record(audio_codes, audio_scales=None, *args, **kwargs):
        captured.append(audio_codes[0])
        return _Out(audio_codes.shape[1])

    audio_encoder.decode = record
    try:
        yield captured
    finally:
        audio_encoder.decode = original


@torch.inference_mode()
def reference_generate_codes(model, req: CodesRequest) -> torch.Tensor:
    """Generate codes with transformers' own `generate` (the reference and the CPU path).

    Randomness comes from torch's global RNG: seed it before the call for reproducible output."""
    dec = model.decoder.config
    k_per_channel = dec.num_codebooks // dec.audio_channels
    steps = decoding_steps(k_per_channel, req.new_frames)
    s = req.sampling
    kwargs = dict(input_ids=req.input_ids, attention_mask=req.attention_mask, do_sample=True,
                  guidance_scale=s.guidance_scale if s.guidance_scale != 1 else None,
                  top_k=s.top_k if s.top_k > 0 else None, top_p=s.top_p if s.top_p > 0 else None,
                  temperature=s.temperature, max_new_tokens=steps)
    if req.chroma is not None:
        kwargs["input_features"] = req.chroma.to(model.dtype)
    if req.prompt_codes is not None:
        b, k, t0 = req.prompt_codes.shape
        # generate() prepends the start token and re-applies the delay pattern; the number of new steps
        # stays `steps`, and the output holds the T0 prompt frames followed by `new_frames` new ones
        kwargs["decoder_input_ids"] = req.prompt_codes.reshape(b * k, t0)
    from transformers import StoppingCriteriaList

    reporter = _StepReporter(steps, req.on_step)
    with _capture_codes(model) as captured:
        model.generate(**kwargs, stopping_criteria=StoppingCriteriaList([reporter]))
    if len(captured) == 2:  # stereo: generate() decodes left then right; interleave them back
        left, right = captured
        codes = torch.stack([left, right], dim=2).reshape(left.shape[0], -1, left.shape[-1])
    else:
        codes = captured[0]
    return codes
