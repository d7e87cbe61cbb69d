"""The container's work behind predict(): load every configured model once, then serve requests.

Configuration (environment):
  COG_MUSIC_WEIGHTS  folder of checkpoints (default: weights/ beside predict.py, or setup's `weights`)
  COG_MUSIC_MODELS   comma-separated model_version names to load (default: every model found there)
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import torch

from lib import audio as audio_io
from lib import catalog
from lib.errors import UserError
from lib.request import Request, check_inputs, resolve_seed

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTPUT_ROOT = Path(os.environ.get("COG_MUSIC_OUTPUTS", Path(tempfile.gettempdir()) / "cog-music-outputs"))
OUTPUT_MAX_AGE_S = 3600  # the server has long read an output file by then


class SetupError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(msg, flush=True)


def weight_files_missing(folder: Path) -> list[str]:
    """What a Hugging Face checkpoint folder lacks to load: config, weights (all shards), tokenizer."""
    missing = [n for n in ("config.json",) if not (folder / n).is_file()]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        import json

        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing += [s for s in shards if not (folder / s).is_file()]
    elif not (folder / "model.safetensors").is_file():
        missing.append("model.safetensors")
    if not any((folder / n).is_file() for n in ("tokenizer.json", "spiece.model")):
        missing.append("tokenizer.json")
    return missing


def files_missing(spec: catalog.ModelSpec, folder: Path) -> list[str]:
    """What a model's folder lacks: a transformers checkpoint (MusicGen) or a diffusers pipeline (the others)."""
    if spec.engine == "musicgen":
        return weight_files_missing(folder)
    from lib.diffusion import pipeline_files_missing

    return pipeline_files_missing(folder)


def resolve_models(weights_dir: Path, wanted: Optional[list[str]]) -> dict[str, catalog.ModelSpec]:
    """The models to load. Raises SetupError naming what is missing and the command that fetches it."""
    if wanted:
        unknown = [n for n in wanted if n not in catalog.MODELS and n not in catalog.EXTRAS]
        if unknown:
            raise SetupError(f"COG_MUSIC_MODELS names unknown models {unknown}; known: {', '.join(catalog.MODELS)} "
                             f"(and the helpers {', '.join(catalog.EXTRAS)})")
        specs = [catalog.MODELS[n] for n in wanted if n in catalog.MODELS]  # EXTRAS are loaded by their features
        if not specs:
            raise SetupError(f"COG_MUSIC_MODELS names no music model (only {', '.join(wanted)}): add one, e.g. small")
    else:
        specs = [m for m in catalog.MODELS.values() if (weights_dir / m.folder).is_dir()]
        if not specs:
            raise SetupError(f"no model weights found in {weights_dir}: fetch some with `script/download-weights "
                             "small` (any of: " + ", ".join(catalog.MODELS) + "), or write tiny random test "
                             f"models with `script/make-tiny-weights {weights_dir}`")
    problems = []
    for spec in specs:
        folder = weights_dir / spec.folder
        missing = ["the folder"] if not folder.is_dir() else files_missing(spec, folder)
        if missing:
            problems.append(f"{spec.name}: {folder} is missing {', '.join(missing)}; fetch it with "
                            f"`script/download-weights {spec.name}`")
    if problems:
        raise SetupError("cannot load the configured models (loading is offline only):\n  " + "\n  ".join(problems))
    return {s.name: s for s in specs}


def engine_class(engine: str):
    """Engines are imported only when a model that needs them is configured."""
    if engine == "musicgen":
        from lib.musicgen import MusicgenEngine

        return MusicgenEngine
    from lib.diffusion import ENGINES

    if engine in ENGINES:
        return ENGINES[engine]
    raise SetupError(f"no engine {engine!r}")


class Service:
    def __init__(self, weights_dir: Optional[Path] = None, models: Optional[list[str]] = None,
                 device: Optional[str] = None):
        self.weights_dir = Path(weights_dir or os.environ.get("COG_MUSIC_WEIGHTS") or REPO_ROOT / "weights")
        if models is None and os.environ.get("COG_MUSIC_MODELS"):
            models = [m.strip() for m in os.environ["COG_MUSIC_MODELS"].split(",") if m.strip()]
        import transformers

        transformers.utils.logging.set_verbosity_error()  # config nags about pad ids every real checkpoint has
        transformers.utils.logging.disable_progress_bar()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.specs = resolve_models(self.weights_dir, models)
        if self.device.type == "cpu":
            # oneDNN builds a convolution primitive per input length, which costs seconds for every new
            # audio length (EnCodec decode of 35 s: 11.6 s with it, 0.3 s without)
            torch.backends.mkldnn.enabled = False
        self.engines = {}
        self._locks = {name: threading.Lock() for name in self.specs}
        for name, spec in self.specs.items():
            t = time.perf_counter()
            try:
                self.engines[name] = engine_class(spec.engine)(spec, self.weights_dir / spec.folder, self.device, dtype)
            except Exception as e:  # a corrupt or incompatible checkpoint: say which one
                raise SetupError(f"{spec.name}: loading {self.weights_dir / spec.folder} failed: "
                                 f"{type(e).__name__}: {e}") from e
            log(f"loaded {name} from {self.weights_dir / spec.folder} on {self.device} in "
                f"{time.perf_counter() - t:.1f}s")
            self._warm_up(name)
        self.mbd = self._load_mbd()
        audio_io.warm_up()
        from lib.image2music import PromptStage  # image2music / enhance_prompt: captioner and prompt writer

        self.prompts = PromptStage.load(self.weights_dir, models, self.device, dtype, log)
        self._finetune = None  # the last replicate_weights converted: (ref, model name, FineTune)

    def _warm_up(self, name: str) -> None:
        """On CUDA, an engine's short warm-up request (diffusion engines; MusicGen warms itself while loading). A
        failure is logged, not fatal: the engine stays loaded and a real request reports its own error."""
        warm_up = getattr(self.engines[name], "warm_up", None)
        if self.device.type != "cuda" or warm_up is None:
            return
        t = time.perf_counter()
        try:
            warm_up()
            log(f"warmed up {name} in {time.perf_counter() - t:.1f}s")
        except Exception as e:  # noqa: BLE001
            log(f"warm-up of {name} failed ({type(e).__name__}: {e}); it stays loaded")
            torch.cuda.empty_cache()

    def _load_mbd(self):
        """Multi-Band Diffusion, once for every MusicGen model, when its weights are in weights/."""
        musicgens = [e for n, e in self.engines.items() if self.specs[n].engine == "musicgen"]
        extra = catalog.EXTRAS["multiband-diffusion"]
        path = self.weights_dir / extra.folder / extra.files[0]
        if not musicgens or not path.is_file():
            return None
        from lib.mbd import MultiBandDiffusion

        t = time.perf_counter()
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        try:
            mbd = MultiBandDiffusion.from_checkpoint(path, device=self.device, dtype=dtype)
        except Exception as e:
            raise SetupError(f"multiband-diffusion: loading {path} failed: {type(e).__name__}: {e}") from e
        for engine in musicgens:
            engine.mbd = mbd
        log(f"loaded multiband-diffusion from {path} on {self.device} in {time.perf_counter() - t:.1f}s")
        return mbd

    def _check_musicgen_extras(self, req: Request, spec) -> None:
        if req.multi_band_diffusion and spec.engine == "musicgen" and self.mbd is None:
            extra = catalog.EXTRAS["multiband-diffusion"]
            raise UserError("multi_band_diffusion", f"Multi-Band Diffusion weights are not in this container "
                                                    f"({self.weights_dir / extra.folder / extra.files[0]} is "
                                                    f"missing): fetch them with `script/download-weights "
                                                    f"{extra.name}` and restart, or set multi_band_diffusion=false")
        if req.replicate_weights and spec.engine != "musicgen":
            raise UserError("replicate_weights", f"fine-tuned weights are MusicGen checkpoints; {spec.name} is "
                                                 "not a MusicGen model")

    def _finetuned(self, req: Request, spec, engine):
        """The converted replicate_weights for this model (the last one is kept in memory)."""
        from lib.audiocraft_checkpoint import FineTune

        ref = req.replicate_weights
        if self._finetune is not None and self._finetune[:2] == (ref, spec.name):
            return self._finetune[2]
        t = time.perf_counter()
        ft = FineTune.load(ref, engine.model, log)
        self._finetune = (ref, spec.name, ft)
        log(f"replicate_weights: loaded fine-tune {ft.digest[:12]} for {spec.name} "
            f"({'LM and EnCodec' if ft.codec_state else 'LM'}) in {time.perf_counter() - t:.1f}s")
        return ft

    def _run_finetuned(self, req: Request, task: str, seed: int, spec, engine):
        """engine.run with the fine-tune swapped into the model for this prediction, the base weights back
        after. The fast decoder keeps fused copies of the decoder weights: they are refilled in place from the
        swapped model, and again from the restored one."""
        ft = self._finetuned(req, spec, engine)
        fast = engine.fast
        try:
            with ft.swapped_into(engine.model):
                if fast is not None:
                    fast.reload_weights()
                return engine.run(req, task, seed, log)
        finally:
            if fast is not None:
                fast.reload_weights()

    def predict(self, req: Request) -> Path:
        t_start = time.perf_counter()
        req = self.prompts.prepare(req, self.specs, log)  # image / enhance_prompt -> a text request, prompt written
        task, spec = check_inputs(req, self.specs)
        engine = self.engines[spec.name]
        seed = resolve_seed(req.seed)
        log(f"task: {task}, model_version: {spec.name}, seed: {seed}")

        self._check_musicgen_extras(req, spec)
        try:
            with self._locks[spec.name]:  # one request at a time per model: engines keep per-request state
                if req.replicate_weights:
                    wav = self._run_finetuned(req, task, seed, spec, engine)
                else:
                    wav = engine.run(req, task, seed, log)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise UserError("duration", "the GPU ran out of memory for this request: try a shorter duration")

        t = time.perf_counter()
        wav = audio_io.normalize(wav, engine.sample_rate, req.normalization_strategy)
        path = self._output_path(f"{spec.engine}-seed{seed}.{req.output_format}")
        audio_io.write_audio(wav, engine.sample_rate, req.output_format, path)
        log(f"wrote {wav.shape[1] / engine.sample_rate:.2f}s, {wav.shape[0]} channel(s), {engine.sample_rate} Hz "
            f"{req.output_format} ({req.normalization_strategy}) in {time.perf_counter() - t:.2f}s; "
            f"total {time.perf_counter() - t_start:.2f}s")
        return path

    @staticmethod
    def _output_path(name: str) -> Path:
        OUTPUT_ROOT.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for old in OUTPUT_ROOT.iterdir():  # outputs of earlier predictions, long since sent
            try:
                if now - old.stat().st_mtime > OUTPUT_MAX_AGE_S:
                    shutil.rmtree(old, ignore_errors=True)
            except FileNotFoundError:
                pass
        return Path(tempfile.mkdtemp(prefix="prediction-", dir=OUTPUT_ROOT)) / name

