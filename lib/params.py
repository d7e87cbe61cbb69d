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
MAX_PROMPT_CHARS = 4000  # longer prompts get a 422: nobody writes one, and they cost encoder memory
MAX_PROMPT_TOKENS = 512  # T5's trained length; longer prompts are truncated (and the logs say so)

TASKS = ("auto", "text2music", "melody", "continuation",  # MusicGen (text2music also ACE-Step, Stable Audio, AudioLDM)
         "cover", "repaint", "extract", "lego", "complete",  # ACE-Step 1.5 (extract/lego/complete: base model)
         "text2audio",  # AudioLDM / AudioLDM 2 / Stable Audio
         "unconditional", "variation",  # Dance Diffusion
         "audio2audio",  # Stable Audio Open (init audio)
         "image2music")  # any text-to-music model, prompted by the image's caption (lib.image2music)
ACE_TRACKS = ("vocals", "backing_vocals", "drums", "bass", "guitar", "keyboard", "percussion", "strings", "synth",
              "fx", "brass", "woodwinds")


@dataclass(frozen=True)
class Param:
    name: str
    type: Any
    default: Any
    description: str
    ge: Optional[float] = None
    le: Optional[float] = None
    choices: Optional[tuple] = None
    max_length: Optional[int] = None  # strings: longer values get a 422

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
        if self.max_length is not None:
            kwargs["max_length"] = self.max_length
        return Input(**kwargs)


_PARAMS = [
    Param("prompt", Optional[str], None,
          "A description of the music you want to generate. Leave empty for unconditional generation. "
          f"Up to {MAX_PROMPT_CHARS} characters; the text encoder reads its first {MAX_PROMPT_TOKENS} tokens.",
          max_length=MAX_PROMPT_CHARS),
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
          "`state_dict.bin` (or a folder / .tar / .zip holding it, as Replicate's MusicGen trainer writes; a "
          "`compression_state_dict.bin` next to it replaces the EnCodec too). Downloaded once, cached by content "
          "hash, swapped into the matching loaded model for this prediction only."),
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
          " (for an explicit task, the first that serves it; a melody model when the task is melody).", choices=tuple(catalog.model_version_choices())),
    Param("task", str, "auto",
          "What to do. `auto`: on a MusicGen model, as Replicate's MusicGen (no input_audio = text2music; input_audio "
          "with continuation = continuation; without = melody); on ACE-Step: text2music, or cover with input_audio "
          "(repaint when a repainting window is set); AudioLDM: text2audio; Dance Diffusion: unconditional, or "
          "variation with input_audio; Stable Audio: text2music, or audio2audio with input_audio. With "
          "model_version=auto, an explicit task picks the first loaded model that serves it. image2music (auto when "
          "`image` is given): the image is captioned, the caption written into a music prompt, and a text-to-music "
          "model generates from it.", choices=TASKS),
    # -- diffusion engines (lib.diffusion). None = the engine's own default. --
    Param("lyrics", Optional[str], None,
          "ACE-Step: song lyrics, with structure tags such as [verse], [chorus], [bridge]; '[Instrumental]' for "
          "none. Up to 4096 characters."),
    Param("negative_prompt", Optional[str], None,
          "AudioLDM / AudioLDM 2 / Stable Audio: what the audio should NOT sound like (e.g. 'low quality, noise')."),
    Param("num_inference_steps", Optional[int], None,
          "Diffusion engines: denoising steps. None = the model's default (ACE-Step turbo 8, base 32; AudioLDM 2 "
          "100; AudioLDM 50; Dance Diffusion 100; Stable Audio 100). More = slower, usually cleaner.", ge=1, le=200),
    Param("guidance_scale", Optional[float], None,
          "Diffusion engines: classifier-free guidance scale (1 = off). None = the model's default (ACE-Step base "
          "7, AudioLDM 2 3.5, AudioLDM 2.5, Stable Audio 7). ACE-Step turbo has guidance distilled in and takes none.",
          ge=1, le=20),
    Param("shift", Optional[float], None,
          "ACE-Step: timestep shift of the flow-matching schedule, t' = shift*t / (1 + (shift-1)*t). None = 3.",
          ge=1, le=5),
    Param("bpm", Optional[int], None, "ACE-Step: tempo in beats per minute. None = let the model choose.",
          ge=30, le=300),
    Param("keyscale", Optional[str], None,
          "ACE-Step: musical key, e.g. 'C major', 'F# minor', 'Am'. None = let the model choose."),
    Param("timesignature", Optional[int], None,
          "ACE-Step: beats per bar: 2 (2/4), 3 (3/4), 4 (4/4) or 6 (6/8). None = let the model choose.", ge=2, le=6),
    Param("vocal_language", Optional[str], None,
          "ACE-Step: language of the lyrics, an ISO 639-1 code (en, zh, ja, es, fr, ...). None = unknown."),
    Param("repainting_start", float, 0,
          "ACE-Step repaint / lego: start, in seconds, of the window of input_audio to regenerate. Outside the window "
          "the audio is input_audio's own samples (20 ms crossfades sit inside the window); with "
          "normalization_strategy=clip they stay sample-identical in the output.", ge=0),
    Param("repainting_end", Optional[float], None,
          "ACE-Step repaint / lego: end of that window in seconds; -1 or None = the end of input_audio.", ge=-1),
    Param("audio_cover_strength", float, 1.0,
          "ACE-Step cover: how much input_audio's structure conditions the cover (1 = strongly; lower values blend in "
          "plain text-to-music, e.g. 0.2 for a loose style transfer).", ge=0, le=1),
    Param("track_name", Optional[str], None,
          "ACE-Step base extract / lego / complete: the stem to extract (extract), generate over input_audio (lego) "
          "or add (complete).", choices=ACE_TRACKS),
    Param("strength", Optional[float], None,
          "Dance Diffusion variation / Stable Audio audio2audio: how far from input_audio to go (how much noise is "
          "added before denoising): near 0 = almost the input, 1 = all new. None = 0.5 (variation), 1 "
          "(audio2audio, diffusers' init-audio behaviour).", ge=0, le=1),
    # -- image2music and the prompt writer (lib.image2music). Rewritten into a text2music request up front. --
    Param("image", "path", None,
          "An image to turn into music (task image2music): a BLIP captioner describes it, a small language model "
          "(or a fixed template when none is loaded) writes that into a music prompt (genre, mood, instruments, "
          "tempo), and the text-to-music model generates from it. A `prompt` given too is passed on as a wish. "
          "PNG, JPEG, WebP, GIF (first frame), BMP or TIFF, up to 30 MiB and 50 megapixels."),
    Param("enhance_prompt", bool, False,
          "If `True`, a small language model rewrites `prompt` into a richer music description (genre, mood, "
          "instruments, tempo) before generation. Seeded: the same seed gives the same rewrite. Both the rewritten "
          "prompt and the image caption are in the logs."),
]

MUSICGEN = ("musicgen",)
DIFFUSION = ("ace-step", "audioldm2", "audioldm", "dance-diffusion", "stable-audio")
# Which engines use an input, and for which tasks (None = all its tasks). An input missing here is used by every
# engine. lib.request refuses an input set to a non-default value when the chosen engine/task ignores it.
USED_BY: dict[str, dict[str, Optional[tuple]]] = {
    "prompt": {e: None for e in MUSICGEN + ("ace-step", "audioldm2", "audioldm", "stable-audio")},
    "continuation": {"musicgen": None},
    "continuation_start": {"musicgen": None},
    "continuation_end": {"musicgen": None},
    "multi_band_diffusion": {"musicgen": None},
    "top_k": {"musicgen": None},
    "top_p": {"musicgen": None},
    "temperature": {"musicgen": None},
    "classifier_free_guidance": {"musicgen": None},
    "lyrics": {"ace-step": None},
    "negative_prompt": {"audioldm2": None, "audioldm": None, "stable-audio": None},
    "num_inference_steps": {e: None for e in DIFFUSION},
    "guidance_scale": {"ace-step": None, "audioldm2": None, "audioldm": None, "stable-audio": None},
    "shift": {"ace-step": None},
    "bpm": {"ace-step": None},
    "keyscale": {"ace-step": None},
    "timesignature": {"ace-step": None},
    "vocal_language": {"ace-step": None},
    "repainting_start": {"ace-step": ("repaint", "lego")},
    "repainting_end": {"ace-step": ("repaint", "lego")},
    "audio_cover_strength": {"ace-step": ("cover",)},
    "track_name": {"ace-step": ("extract", "lego", "complete")},
    "strength": {"dance-diffusion": ("variation",), "stable-audio": ("audio2audio",)},
}

PARAMS: dict[str, Param] = {p.name: p for p in _PARAMS}
DEFAULTS: dict[str, Any] = {p.name: p.default for p in _PARAMS}
