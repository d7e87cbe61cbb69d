"""Every model the container knows: its `model_version` name, its Hugging Face repo, and its folder in weights/.

The one list that the download script, setup() and the `model_version` input all read."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the `model_version` value users send (Replicate's meta/musicgen names for MusicGen)
    repo: str  # Hugging Face repo id
    engine: str  # which lib engine serves it
    folder: str  # folder under weights/
    stereo: bool = False
    melody: bool = False
    size: str = ""
    tasks: tuple = ()  # the `task` values it serves; empty = the MusicGen ones (see tasks_of)
    # extra download patterns: maestro-150k ships only PyTorch .bin weights (diffusers reads them with
    # torch.load(weights_only=True), so no code is unpickled); everything else is safetensors
    extra_files: tuple = ()


def _musicgen(name: str, size: str, stereo: bool = False, melody: bool = False) -> ModelSpec:
    return ModelSpec(name=name, repo=f"facebook/musicgen-{name}", engine="musicgen", folder=f"musicgen-{name}",
                     stereo=stereo, melody=melody, size=size)


MODELS: dict[str, ModelSpec] = {m.name: m for m in [
    # Replicate's meta/musicgen default comes first: "auto" picks the first one loaded, in this order.
    _musicgen("stereo-melody-large", "large", stereo=True, melody=True),
    _musicgen("stereo-large", "large", stereo=True),
    _musicgen("melody-large", "large", melody=True),
    _musicgen("large", "large"),
    _musicgen("stereo-medium", "medium", stereo=True),
    _musicgen("medium", "medium"),
    _musicgen("stereo-melody", "medium", stereo=True, melody=True),
    _musicgen("melody", "medium", melody=True),
    _musicgen("stereo-small", "small", stereo=True),
    _musicgen("small", "small"),
    # Diffusion engines (lib.diffusion), after MusicGen so `auto` keeps picking MusicGen first.
    ModelSpec(name="ace-step-1.5-turbo", repo="ACE-Step/acestep-v15-xl-turbo-diffusers", engine="ace-step",
              folder="ace-step-1.5-turbo", stereo=True, tasks=("text2music", "cover", "repaint")),
    ModelSpec(name="ace-step-1.5-base", repo="ACE-Step/acestep-v15-xl-base-diffusers", engine="ace-step",
              folder="ace-step-1.5-base", stereo=True,
              tasks=("text2music", "cover", "repaint", "extract", "lego", "complete")),
    ModelSpec(name="audioldm2-music", repo="cvssp/audioldm2-music", engine="audioldm2", folder="audioldm2-music",
              tasks=("text2audio", "text2music")),
    ModelSpec(name="audioldm", repo="cvssp/audioldm-s-full-v2", engine="audioldm", folder="audioldm-s-full-v2",
              tasks=("text2audio", "text2music")),
    ModelSpec(name="dance-diffusion-maestro", repo="harmonai/maestro-150k", engine="dance-diffusion",
              folder="dance-diffusion-maestro-150k", stereo=True, tasks=("unconditional", "variation"),
              extra_files=("*.bin",)),
    ModelSpec(name="stable-audio-open", repo="stabilityai/stable-audio-open-1.0", engine="stable-audio",
              folder="stable-audio-open-1.0", stereo=True, tasks=("text2music", "text2audio", "audio2audio")),
]}

AUTO = "auto"


def by_folder(folder: str) -> ModelSpec | None:
    return next((m for m in MODELS.values() if m.folder == folder), None)


def tasks_of(spec: ModelSpec) -> tuple:
    if spec.tasks:
        return spec.tasks
    return ("text2music", "melody", "continuation") if spec.melody else ("text2music", "continuation")


def model_version_choices() -> list[str]:
    return [AUTO, *MODELS]


@dataclass(frozen=True)
class ExtraSpec:
    """Weights that serve no `model_version` of their own but add a feature to loaded models."""
    name: str  # the name `script/download-weights` takes
    repo: str  # Hugging Face repo id
    folder: str  # folder under weights/
    files: tuple  # the files of the repo to fetch (a subset of it)
    engine: str
    feature: str  # the input it enables


EXTRAS: dict[str, ExtraSpec] = {e.name: e for e in [
    # Multi-Band Diffusion decoder for MusicGen's 32 kHz EnCodec codes (lib.mbd): only the MusicGen file
    ExtraSpec(name="multiband-diffusion", repo="facebook/multiband-diffusion", folder="multiband-diffusion",
              files=("mbd_musicgen_32khz.th",), engine="mbd", feature="multi_band_diffusion"),
    # image2music / enhance_prompt (lib.image2music): an image captioner and an instruction-tuned prompt writer
    ExtraSpec(name="blip-captioning-base", repo="Salesforce/blip-image-captioning-base",
              folder="blip-image-captioning-base", engine="captioner", feature="image",
              files=("config.json", "model.safetensors", "preprocessor_config.json", "special_tokens_map.json",
                     "tokenizer.json", "tokenizer_config.json", "vocab.txt")),
    ExtraSpec(name="qwen2.5-0.5b-instruct", repo="Qwen/Qwen2.5-0.5B-Instruct", folder="qwen2.5-0.5b-instruct",
              engine="prompt-writer", feature="enhance_prompt",
              files=("config.json", "generation_config.json", "model.safetensors", "merges.txt", "tokenizer.json",
                     "tokenizer_config.json", "vocab.json")),
]}
