"""Every predict() input: type, default, range, choices and description, declared once.

predict.py builds its signature from these (so the OpenAPI schema shows them) and lib.request validates
combinations against the same values. The first fields are Replicate's MusicGen schema (seed 003) with
the same names and defaults; types are widened only where that keeps old clients working (an integer is
a valid number)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from lib import audio, catalog

MAX_DURATION_S = 300.0  # longest MusicGen output: windowed extension past 30 s, up to 5 minutes
MUSICGEN_WINDOW_S = 30.0  # MusicGen's training context
EXTEND_STRIDE_S = 18.0  # each new window keeps the last 30 - 18 = 12 s as its prompt (Replicate/audiocraft)
MAX_SEED = 2**32 - 1

TASKS = ("auto", "text2music", "melody", "continuation")


@dataclass(frozen=True)
class Param:
    name: str
    type: Any
    default: Any
    description: str
    ge: Optional[float] = None
    le: Optional[float] = None
    choices: Optional[tuple] = None

    def input(self):
        """The cog.Input for this parameter (imported lazily so lib/ works without cog installed)."""
        from cog import Input

        kwargs = dict(default=self.default, description=self.description)
        if self.ge is not None:
            kwargs["ge"] = self.ge
        if self.le is not None:
            kwargs["le"] = self.le
        if self.choices is not None:
            kwargs["choices"] = list(self.choices)
        return Input(**kwargs)


_PARAMS = [
    Param("prompt", Optional[str], None,
          "A description of the music you want to generate. Leave empty for unconditional generation."),
    Param("input_audio", "path", None,
          "An audio file that will influence the generated music. If `continuation` is `True`, the generated "
          "music will be a continuation of the audio file. Otherwise, the generated music will mimic the audio "
          "file's melody (melody models). Any format ffmpeg decodes (wav, mp3, flac, ogg, m4a), up to "
          f"{audio.MAX_INPUT_SECONDS:.0f} s and {audio.MAX_INPUT_BYTES // 2**20} MiB."),
    Param("duration", float, 8,
          f"Duration of the generated audio in seconds (fractions allowed). Past {MUSICGEN_WINDOW_S:.0f} s the "
          f"music is extended window by window, each window prompted with the last "
          f"{MUSICGEN_WINDOW_S - EXTEND_STRIDE_S:.0f} s.", ge=1, le=MAX_DURATION_S),
    Param("continuation", bool, False,
          "If `True`, generated music will continue `input_audio`. Otherwise, generated music will mimic "
          "`input_audio`'s melody."),
    Param("continuation_start", float, 0,
          "Start time, in seconds, of the part of `input_audio` to continue (fractions allowed).", ge=0),
    Param("continuation_end", Optional[float], None,
          "End time, in seconds, of the part of `input_audio` to continue. If -1 or None, the end of the clip. "
          "The part must be shorter than `duration` and than 30 s: the output contains it, followed by new music.",
          ge=-1),
    Param("multi_band_diffusion", bool, False,
          "If `True`, the EnCodec tokens will be decoded with MultiBand Diffusion (mono and stereo MusicGen "
          "models; stereo decodes left and right separately). Needs the multiband-diffusion weights."),
    Param("replicate_weights", Optional[str], None,
          "MusicGen fine-tune to use for this prediction: an http(s) URL or a path to audiocraft's exported "
          "`state_dict.bin` (or a .tar/.zip holding it, as Replicate's MusicGen trainer writes). Downloaded once, "
          "cached by content hash, swapped into the matching loaded model for this prediction only."),
    Param("normalization_strategy", str, "loudness",
          "Strategy for normalizing audio: loudness = -14 LUFS (ITU-R BS.1770-4), peak = -1 dBFS, "
          "rms = -18 dBFS then clip, clip = clamp to [-1, 1].", choices=audio.NORMALIZATION_STRATEGIES),
    Param("top_k", int, 250, "Reduces sampling to the k most likely tokens (0 = no top-k filter).", ge=0, le=2048),
    Param("top_p", float, 0,
          "Reduces sampling to tokens with cumulative probability of p. When set to `0` (default), top_k "
          "sampling is used.", ge=0, le=1),
    Param("temperature", float, 1,
          "Controls the 'conservativeness' of the sampling process. Higher temperature means more diversity; "
          "0 picks the most likely token every step.", ge=0, le=5),
    Param("classifier_free_guidance", float, 3,
          "Increases the influence of inputs on the output. Higher values produce lower-variance outputs that "
          "adhere more closely to inputs. 1 turns guidance off; fractions allowed.", ge=1, le=20),
    Param("output_format", str, "wav",
          "Output format: wav (16-bit PCM), flac (16-bit, lossless), mp3 (320 kbps CBR).",
          choices=audio.OUTPUT_FORMATS),
    Param("seed", Optional[int], None,
          "Seed for random number generator. If None or -1, a random seed will be used (and printed in the "
          "logs). 0 is a valid seed.", ge=-1, le=MAX_SEED),
    Param("model_version", str, catalog.AUTO,
          "Model to use. `auto` picks the first loaded of: " + ", ".join(catalog.MODELS) +
          " (a melody model when the task is melody).", choices=tuple(catalog.model_version_choices())),
    Param("task", str, "auto",
          "What to do. `auto` derives it as Replicate's MusicGen does: no input_audio = text2music; input_audio "
          "with continuation = continuation; input_audio without continuation = melody.", choices=TASKS),
]

PARAMS: dict[str, Param] = {p.name: p for p in _PARAMS}
DEFAULTS: dict[str, Any] = {p.name: p.default for p in _PARAMS}
