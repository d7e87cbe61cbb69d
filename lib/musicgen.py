"""The MusicGen engine: text / melody / continuation -> EnCodec codes -> audio, any length.

Pipeline (read top to bottom in `generate`): encode the prompt audio (continuation) -> loop over 30 s
windows, each prompted with the last 12 s of codes (windowed extension, as audiocraft does past 30 s) ->
decode codes to audio. Token generation is transformers' `generate` on CPU (the reference) and our own
CUDA-graph decoder on GPU (lib.musicgen_fast), behind the same `CodesRequest` contract."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from lib import audio as audio_io
from lib import chroma as chroma_lib
from lib.catalog import ModelSpec
from lib.errors import UserError
from lib.lstm import fused_lstm
from lib.musicgen_codes import FRAME_RATE, CodesRequest, Sampling, reference_generate_codes
from lib.params import EXTEND_STRIDE_S, MAX_PROMPT_TOKENS, MUSICGEN_WINDOW_S
from lib.request import check_window_fits

WINDOW_FRAMES = int(MUSICGEN_WINDOW_S * FRAME_RATE)
KEEP_FRAMES = int((MUSICGEN_WINDOW_S - EXTEND_STRIDE_S) * FRAME_RATE)  # prompt of each extension window


@dataclass
class MusicgenJob:
    prompt: Optional[str]
    duration: float
    sampling: Sampling
    seed: int
    melody: Optional[np.ndarray] = None  # (channels, samples) at the model rate: follow its melody
    continue_audio: Optional[np.ndarray] = None  # (channels, samples) at the model rate: continue it
    log: Callable[[str], None] = print
    multi_band_diffusion: bool = False  # decode with Multi-Band Diffusion (self.mbd) instead of EnCodec


class MusicgenEngine:
    def __init__(self, spec: ModelSpec, folder: Path, device: torch.device, dtype: torch.dtype):
        from transformers import (AutoTokenizer, MusicgenForConditionalGeneration,
                                  MusicgenMelodyForConditionalGeneration)

        self.spec, self.device = spec, device
        cls = MusicgenMelodyForConditionalGeneration if spec.melody else MusicgenForConditionalGeneration
        self.model = cls.from_pretrained(folder, dtype=dtype).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        dec = self.model.decoder.config
        self.sample_rate = int(self.model.config.audio_encoder.sampling_rate)
        self.channels = int(dec.audio_channels)
        self.codebook_size = int(dec.vocab_size)
        self.fast = None
        self.mbd = None  # a lib.mbd.MultiBandDiffusion, set by the service when its weights are present
        if device.type == "cuda":
            from lib.musicgen_fast import FastMusicgen

            self.fast = FastMusicgen(self.model, device=device, dtype=dtype)
            self._warm_up()

    def _warm_up(self) -> None:
        """Compile the Triton kernels and capture the default CUDA graphs now, in setup: otherwise the first
        request pays for it (7.7 s on an H100 for a 3 s clip that then takes 0.03 s). With guidance for prompts of
        up to 16, 32 and 64 tokens (the text-length buckets of most prompts: each has its own decode-step and text
        encoder graphs and, for the folded cross-attention, its own kernel shapes), and without guidance. Then
        EnCodec decodes the codes once, which compiles its LSTM kernel (lib/lstm.py): the first request paid that,
        0.14 s from Triton's disk cache and 0.77 s without it on an H100 (bench/first_request_probe.py)."""
        input_ids, mask = self._text("warm up")
        runs = [(input_ids[:, :1].repeat(1, n), 3.0) for n in (16, 32, 64)] + [(input_ids, 1.0)]
        for ids, guidance in runs:
            req = CodesRequest(input_ids=ids, attention_mask=torch.ones_like(ids) if guidance > 1 else mask,
                               new_frames=8,
                               sampling=Sampling(top_k=min(250, self.codebook_size), guidance_scale=guidance))
            codes = self.fast.generate_codes(req, torch.Generator(device=self.device).manual_seed(0))
        self.decode_codes(codes)

    # -- stages ---------------------------------------------------------------------------------------

    def _text(self, prompt: Optional[str], log=print):
        tokens = self.tokenizer([prompt or ""], return_tensors="pt", padding=True, truncation=True,
                                max_length=MAX_PROMPT_TOKENS)
        if prompt and tokens.input_ids.shape[1] >= MAX_PROMPT_TOKENS:
            log(f"prompt truncated to its first {MAX_PROMPT_TOKENS} tokens (the text encoder's length)")
        input_ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device)
        if not prompt:
            mask = torch.zeros_like(mask)  # a masked-out text is MusicGen's null condition: unconditional music
        return input_ids, mask

    @torch.inference_mode()
    def encode_audio(self, audio: np.ndarray) -> torch.Tensor:
        """(channels, samples) -> de-delayed codes (1, K, T); stereo codes left/right interleaved."""
        enc = self.model.audio_encoder
        wav = torch.from_numpy(audio).to(self.device, enc.dtype)
        per_channel = [enc.encode(ch[None, None], bandwidth=enc.config.target_bandwidths[0]).audio_codes[0]
                       for ch in wav]  # each (1, K, T)
        if len(per_channel) == 1:
            return per_channel[0]
        left, right = per_channel
        return torch.stack([left, right], dim=2).reshape(1, -1, left.shape[-1])

    @torch.inference_mode()
    def decode_codes(self, codes: torch.Tensor, multi_band_diffusion: bool = False, seed: int = 0) -> np.ndarray:
        """(1, K, T) codes -> (channels, samples) float32 audio (EnCodec, or Multi-Band Diffusion)."""
        enc = self.model.audio_encoder
        streams = [codes] if self.channels == 1 else [codes[:, ::2], codes[:, 1::2]]
        if multi_band_diffusion:
            if self.mbd is None:
                raise RuntimeError("multi_band_diffusion asked but no Multi-Band Diffusion decoder is loaded")
            from lib.mbd import EncodecCodec

            # stereo: left and right code streams decoded as two batch items
            gen = torch.Generator(device=self.mbd.device).manual_seed(seed)
            out = self.mbd.decode(torch.cat(streams, dim=0), EncodecCodec(enc), generator=gen)
            return out[:, 0].float().cpu().numpy()
        with fused_lstm(enc.decoder):  # its LSTM as one launch per layer on CUDA (lib/lstm.py)
            out = [enc.decode(s[None], audio_scales=[None]).audio_values[0, 0] for s in streams]
        return torch.stack(out).float().cpu().numpy()

    def _generate_codes(self, req: CodesRequest, generator: Optional[torch.Generator]) -> torch.Tensor:
        if self.fast is not None:
            return self.fast.generate_codes(req, generator)
        return reference_generate_codes(self.model, req)

    # -- the pipeline -----------------------------------------------------------------------------------

    def run(self, req, task: str, seed: int, log) -> np.ndarray:
        """The engine entry point: a checked Request and its task -> (channels, samples) float audio."""
        melody = continue_audio = None
        if task == "melody":
            melody = audio_io.load_audio(req.input_audio, self.sample_rate, 1)
        elif task == "continuation":
            continue_audio = self._continuation_window(req)
        sampling = Sampling(top_k=int(req.top_k), top_p=float(req.top_p), temperature=float(req.temperature),
                            guidance_scale=float(req.classifier_free_guidance))
        return self.generate(MusicgenJob(prompt=req.prompt, duration=float(req.duration), seed=seed, melody=melody,
                                         continue_audio=continue_audio, log=log, sampling=sampling,
                                         multi_band_diffusion=bool(req.multi_band_diffusion)))

    def _continuation_window(self, req) -> np.ndarray:
        """The [continuation_start, continuation_end] slice of input_audio, checked against the clip."""
        clip = audio_io.load_audio(req.input_audio, self.sample_rate, self.channels)
        clip_s = clip.shape[1] / self.sample_rate
        start = float(req.continuation_start)
        end = clip_s if req.continuation_end in (None, -1) else float(req.continuation_end)
        if start >= clip_s:
            raise UserError("continuation_start", f"{start:g} s is past the end of input_audio ({clip_s:.2f} s long)")
        if end > clip_s + 1e-6:
            raise UserError("continuation_end", f"{end:g} s is past the end of input_audio ({clip_s:.2f} s long)")
        check_window_fits(end - start, float(req.duration))
        return clip[:, int(round(start * self.sample_rate)): int(round(end * self.sample_rate))]

    def generate(self, job: MusicgenJob) -> np.ndarray:
        timings = {}
        t0 = time.perf_counter()
        input_ids, mask = self._text(job.prompt, job.log)
        total_samples = int(round(job.duration * self.sample_rate))
        total_frames = math.ceil(total_samples / (self.sample_rate / FRAME_RATE))
        sampling = replace(job.sampling, top_k=min(job.sampling.top_k, self.codebook_size))
        if sampling.temperature == 0:  # greedy = keep only the most likely token
            sampling = replace(sampling, top_k=1, top_p=0.0, temperature=1.0)

        codes = None
        if job.continue_audio is not None:
            codes = self.encode_audio(job.continue_audio)
        melody_chroma = None
        if job.melody is not None:
            melody_chroma = chroma_lib.chromagram(torch.from_numpy(job.melody.mean(axis=0)), self.sample_rate)
        timings["prepare"] = time.perf_counter() - t0

        torch.manual_seed(job.seed)  # the reference path samples from the global RNG
        generator = torch.Generator(device=self.device).manual_seed(job.seed) if self.fast is not None else None
        t1 = time.perf_counter()
        start_frames = 0 if codes is None else codes.shape[-1]
        progress = _Progress(job.log, total_frames - start_frames)
        while codes is None or codes.shape[-1] < total_frames:
            prompt = None if codes is None else codes[..., -min(codes.shape[-1], KEEP_FRAMES):]
            prompt_frames = 0 if prompt is None else prompt.shape[-1]
            new = min(total_frames - (0 if codes is None else codes.shape[-1]), WINDOW_FRAMES - prompt_frames)
            window_chroma = None
            if self.spec.melody:
                window_start_s = (0 if codes is None else codes.shape[-1] - prompt_frames) / FRAME_RATE
                window_chroma = self._melody_window(melody_chroma, window_start_s, (prompt_frames + new) / FRAME_RATE)
            req = CodesRequest(input_ids=input_ids, attention_mask=mask, new_frames=new, sampling=sampling,
                               prompt_codes=prompt, chroma=window_chroma, on_step=progress.window(new))
            out = self._generate_codes(req, generator)
            codes = out if codes is None else torch.cat([codes, out[..., prompt_frames:]], dim=-1)
        timings["tokens"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        audio = self.decode_codes(codes[..., :total_frames], job.multi_band_diffusion, job.seed)[:, :total_samples]
        timings["decode"] = time.perf_counter() - t2
        job.log("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
        return audio

    def _melody_window(self, melody_chroma, start_s: float, seconds: float):
        if melody_chroma is None:
            return None  # a melody model without a melody: transformers uses its null chroma
        frames = chroma_lib.frames_for(seconds, self.sample_rate)
        return chroma_lib.window(melody_chroma, start_s, frames, self.sample_rate)[None].to(self.device)


class _Progress:
    """Logs frames generated out of the total, at most every ~10% or 5 s, across windows."""

    def __init__(self, log, total_frames: int):
        self.log, self.total, self.done_before, self.last_log = log, max(total_frames, 1), 0, 0.0
        self.last_pct = -1

    def window(self, new_frames: int):
        base = self.done_before
        self.done_before += new_frames

        def on_step(done: int, total: int):
            frames = base + max(0, done - (total - new_frames))  # the first K-1 steps emit no full frame
            pct = int(100 * frames / self.total)
            now = time.monotonic()
            if frames >= self.total or pct >= self.last_pct + 10 or now - self.last_log > 5:
                self.last_pct, self.last_log = pct, now
                self.log(f"generating: {frames}/{self.total} frames "
                         f"({frames / FRAME_RATE:.1f}/{self.total / FRAME_RATE:.1f} s of audio)")
        return on_step
