"""A prediction request: the raw inputs checked against lib.params, the task derived, the model chosen.

Range checks are repeated here (the HTTP server validates against the OpenAPI schema, but direct calls
to predict() and `script/predict` without a schema must give the same answers)."""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from lib import catalog
from lib.errors import UserError
from lib.params import MUSICGEN_WINDOW_S, PARAMS, USED_BY


@dataclass
class Request:
    prompt: Optional[str] = PARAMS["prompt"].default
    input_audio: Optional[Path] = None
    duration: float = PARAMS["duration"].default
    continuation: bool = PARAMS["continuation"].default
    continuation_start: float = PARAMS["continuation_start"].default
    continuation_end: Optional[float] = PARAMS["continuation_end"].default
    multi_band_diffusion: bool = PARAMS["multi_band_diffusion"].default
    replicate_weights: Optional[str] = PARAMS["replicate_weights"].default
    normalization_strategy: str = PARAMS["normalization_strategy"].default
    top_k: int = PARAMS["top_k"].default
    top_p: float = PARAMS["top_p"].default
    temperature: float = PARAMS["temperature"].default
    classifier_free_guidance: float = PARAMS["classifier_free_guidance"].default
    output_format: str = PARAMS["output_format"].default
    seed: Optional[int] = PARAMS["seed"].default
    model_version: str = PARAMS["model_version"].default
    task: str = PARAMS["task"].default
    lyrics: Optional[str] = PARAMS["lyrics"].default
    negative_prompt: Optional[str] = PARAMS["negative_prompt"].default
    num_inference_steps: Optional[int] = PARAMS["num_inference_steps"].default
    guidance_scale: Optional[float] = PARAMS["guidance_scale"].default
    shift: Optional[float] = PARAMS["shift"].default
    bpm: Optional[int] = PARAMS["bpm"].default
    keyscale: Optional[str] = PARAMS["keyscale"].default
    timesignature: Optional[int] = PARAMS["timesignature"].default
    vocal_language: Optional[str] = PARAMS["vocal_language"].default
    repainting_start: float = PARAMS["repainting_start"].default
    repainting_end: Optional[float] = PARAMS["repainting_end"].default
    audio_cover_strength: float = PARAMS["audio_cover_strength"].default
    track_name: Optional[str] = PARAMS["track_name"].default
    strength: Optional[float] = PARAMS["strength"].default
    image: Optional[Path] = None
    enhance_prompt: bool = PARAMS["enhance_prompt"].default
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_inputs(cls, **inputs: Any) -> "Request":
        names = {f.name for f in fields(cls)} - {"extra"}
        unknown = set(inputs) - names
        if unknown:
            raise UserError(sorted(unknown)[0], f"unknown input; known inputs are {', '.join(sorted(names))}")
        return cls(**inputs)

    def is_default(self, name: str) -> bool:
        return getattr(self, name) == PARAMS[name].default


def _check_ranges(req: Request) -> None:
    for name, p in PARAMS.items():
        value = getattr(req, name)
        if value is None or p.type == "path":
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(name, f"must be a finite number, got {value}")
        if p.max_length is not None and isinstance(value, str) and len(value) > p.max_length:
            raise UserError(name, f"is {len(value)} characters long, over the {p.max_length} limit: shorten it")
        if p.choices is not None and value not in p.choices:
            raise UserError(name, f"must be one of {', '.join(map(str, p.choices))}, got {value!r}")
        if p.ge is not None and value < p.ge:
            raise UserError(name, f"must be at least {p.ge:g}, got {value}")
        if p.le is not None and value > p.le:
            raise UserError(name, f"must be at most {p.le:g}, got {value}")


def resolve_seed(seed: Optional[int]) -> int:
    """None or -1 draws a random seed; every other value (0 included) is used as given."""
    if seed is None or seed == -1:
        return secrets.randbelow(2**32)
    return int(seed)


def derive_task(req: Request, model: Optional[catalog.ModelSpec] = None) -> str:
    """The task for `auto`: MusicGen's derivation (Replicate's) on a MusicGen model, the natural one elsewhere."""
    if req.task != "auto":
        return req.task
    engine = model.engine if model is not None else "musicgen"
    has_audio = req.input_audio is not None
    if engine == "musicgen":
        if not has_audio:
            return "text2music"
        return "continuation" if req.continuation else "melody"
    if engine == "ace-step":
        if not has_audio:
            return "text2music"
        window_set = not req.is_default("repainting_start") or req.repainting_end not in (None, -1)
        return "repaint" if window_set else "cover"
    if engine in ("audioldm", "audioldm2"):
        return "text2audio"
    if engine == "dance-diffusion":
        return "variation" if has_audio else "unconditional"
    if engine == "stable-audio":
        return "audio2audio" if has_audio else "text2music"
    return "text2music"


def choose_model(req: Request, task: str, loaded: dict[str, catalog.ModelSpec]) -> catalog.ModelSpec:
    """The model for this request: the one asked for, or for `auto` the first loaded in catalog order."""
    if not loaded:
        raise UserError("model_version", "no model is loaded in this container: see the setup logs")
    if req.model_version != catalog.AUTO:
        if req.model_version not in catalog.MODELS:
            raise UserError("model_version", f"unknown model {req.model_version!r}; known: {', '.join(catalog.MODELS)}")
        if req.model_version not in loaded:
            spec = catalog.MODELS[req.model_version]
            raise UserError("model_version", f"{req.model_version} is not loaded in this container (loaded: "
                                             f"{', '.join(loaded)}). Fetch it with `script/download-weights "
                                             f"{spec.name}` and restart, or pick a loaded one.")
        return loaded[req.model_version]
    if task == "melody":
        candidates = [m for m in loaded.values() if m.melody]
    else:
        candidates = [m for m in loaded.values() if task in catalog.tasks_of(m)]
    if not candidates and task == "melody":
        raise UserError("input_audio", "input_audio without continuation asks to follow its melody, which needs a "
                                       "melody model, and none is loaded: set continuation=true to continue the "
                                       "audio instead")
    if not candidates:
        able = [m.name for m in catalog.MODELS.values() if task in catalog.tasks_of(m)]
        raise UserError("task", f"no loaded model serves task {task} (loaded: {', '.join(loaded)}); it needs one of "
                                f"{', '.join(able)}")
    order = list(catalog.MODELS)
    return min(candidates, key=lambda m: order.index(m.name))


def check_inputs(req: Request, loaded: dict[str, catalog.ModelSpec]) -> tuple[str, catalog.ModelSpec]:
    """Validate one request up front, before any model work. Returns (task, model)."""
    _check_ranges(req)
    if req.task == "auto":
        # the engine decides what `auto` means: the model asked for, or the first loaded in catalog order
        if req.model_version != catalog.AUTO or not loaded:
            first = choose_model(req, "text2music", loaded)
        else:
            order = list(catalog.MODELS)
            first = min(loaded.values(), key=lambda m: order.index(m.name))
        task = derive_task(req, first)
    else:
        task = req.task
    model = choose_model(req, task, loaded)
    _check_task_and_ignored_inputs(req, task, model)
    if model.engine != "musicgen":
        return task, model
    if task in ("melody", "continuation") and req.input_audio is None:
        raise UserError("input_audio", f"task {task} needs an input_audio")
    if req.continuation and req.input_audio is None:
        raise UserError("input_audio", "continuation=true needs an input_audio to continue: add one, or set "
                                       "continuation=false")
    if task == "text2music" and req.input_audio is not None:
        raise UserError("input_audio", "text2music ignores input_audio: remove it, or set task to melody or "
                                       "continuation")
    if task == "melody":
        if not model.melody:
            melody_models = [m.name for m in loaded.values() if m.melody]
            hint = f"use a melody model ({', '.join(melody_models)})" if melody_models else "load a melody model"
            raise UserError("model_version", f"{model.name} cannot follow a melody: {hint}, or set "
                                             "continuation=true to continue input_audio instead")
        if req.continuation:
            raise UserError("continuation", "task melody follows input_audio's melody; continuation=true asks to "
                                            "continue it instead: set one or the other")
    if task != "continuation":
        for name in ("continuation_start", "continuation_end"):
            if not req.is_default(name) and not (name == "continuation_end" and req.continuation_end == -1):
                raise UserError(name, "only used when continuing input_audio (continuation=true)")
    else:
        end = req.continuation_end
        if end is not None and end != -1:
            if end < 0:
                raise UserError("continuation_end", f"must be -1 (end of clip) or a time in seconds >= 0, got {end}")
            if end <= req.continuation_start:
                raise UserError("continuation_end", f"must be after continuation_start ({req.continuation_start:g} "
                                                    f"s), got {end:g} s")
            window = end - req.continuation_start
            check_window_fits(window, req.duration)
    return task, model


def _users(name: str) -> str:
    from lib.diffusion import ENGINE_LABELS

    parts = []
    for engine, tasks in USED_BY[name].items():
        label = ENGINE_LABELS.get(engine, engine)
        parts.append(label if tasks is None else f"{label} ({'/'.join(tasks)})")
    return ", ".join(parts)


def _check_task_and_ignored_inputs(req: Request, task: str, model: catalog.ModelSpec) -> None:
    """The model serves the task, and no input it ignores is set to a non-default value."""
    from lib.diffusion import ENGINE_LABELS

    tasks = catalog.tasks_of(model)
    if task not in tasks and not (model.engine == "musicgen" and task == "melody"):  # MusicGen says it below
        able = [m.name for m in catalog.MODELS.values() if task in catalog.tasks_of(m)]
        raise UserError("task", f"{model.name} ({ENGINE_LABELS.get(model.engine, model.engine)}) does not do {task}: "
                                f"it does {', '.join(tasks)}. For {task} use {', '.join(able) or 'no model'}")
    for name, users in USED_BY.items():
        if model.engine == "musicgen" and name in ("continuation", "continuation_start", "continuation_end",
                                                   "multi_band_diffusion"):
            continue  # MusicGen's own checks below say it best
        if name == "repainting_end" and req.repainting_end == -1:
            continue  # -1 is the documented "end of clip", same as the default None
        if req.is_default(name):
            continue
        used = model.engine in users and (users[model.engine] is None or task in users[model.engine])
        if model.engine == "ace-step" and name == "guidance_scale" and "base" not in model.name and \
                model.name.endswith("turbo"):
            used = False  # turbo has guidance distilled into its weights
        if not used:
            where = f"{model.name} ({ENGINE_LABELS.get(model.engine, model.engine)}) with task {task}"
            hint = (" (turbo has guidance distilled in: use ace-step-1.5-base for guidance)"
                    if name == "guidance_scale" and model.engine == "ace-step" else "")
            raise UserError(name, f"{where} ignores this input{hint}; it is used by {_users(name)}. Leave it at "
                                  f"its default ({PARAMS[name].default!r}) or pick a model that uses it")


def check_window_fits(window_s: float, duration: float) -> None:
    """The continued window must leave room for new music within one 30 s MusicGen window."""
    limit = min(duration, MUSICGEN_WINDOW_S)
    if window_s >= limit:
        raise UserError("continuation_end", f"the continued part is {window_s:.2f} s long but must be shorter than "
                                            f"{limit:g} s (min of duration and {MUSICGEN_WINDOW_S:.0f} s): the "
                                            "output holds that part followed by new music. Shorten the window or "
                                            "raise duration.")
