"""Image to music, and the optional prompt writer (issue 7; PaddleMIX's music generation, seed 004).

    image --(BLIP caption)--> caption --(prompt writer: LM or template)--> music prompt --> any text-to-music
    engine, through the same check_inputs -> engine.run path as a typed prompt (a new Request, task text2music)

`enhance_prompt=true` sends a short typed prompt through the same LM writer first. The caption and the final
prompt are logged. The captioner and the LM are loaded in setup() when their folders are in weights/ (or, when
COG_MUSIC_MODELS is set, only when it names them); without the LM, image2music falls back to a deterministic
template, and enhance_prompt fails with the command that fetches the LM.

Images are untrusted: size-limited in bytes and pixels (checked from the header, before any pixel is decoded),
restricted to common still-image formats, verified, decoded by Pillow with decompression-bomb warnings turned
into errors, EXIF-rotated, flattened onto white and converted to RGB."""
from __future__ import annotations

import dataclasses
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from lib import catalog
from lib.errors import UserError
from lib.prompt_writer import LMWriter, TemplateWriter, writer_files_missing

MAX_IMAGE_BYTES = 30 * 2**20
MAX_IMAGE_PIXELS = 50_000_000  # e.g. 8660 x 5773; larger is refused from the header, before decoding
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # Pillow plugins tried (JPEG also opens MPO)
DECODE_SIDE = 1024  # the captioner sees 384 px: JPEGs are decoded at reduced scale down to about this
MAX_CAPTION_CHARS = 300

CAPTIONER = "blip-captioning-base"
WRITER = "qwen2.5-0.5b-instruct"
FEATURE_NAMES = (CAPTIONER, WRITER)


# -- decoding an untrusted image ---------------------------------------------------------------------------

def load_image(path, field: str = "image"):
    """A PIL RGB image from an untrusted file, or a UserError naming `field` that says what is wrong."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise UserError(field, f"cannot read the file: {e.strerror or e}")
    if size == 0:
        raise UserError(field, "the file is empty")
    if size > MAX_IMAGE_BYTES:
        raise UserError(field, f"the file is {size / 2**20:.1f} MiB, over the {MAX_IMAGE_BYTES // 2**20} MiB limit: "
                               "send a smaller image (the captioner sees 384 x 384 pixels)")
    formats = ", ".join(IMAGE_FORMATS)

    def check_header(im) -> None:
        w, h = im.size
        if w < 1 or h < 1:
            raise UserError(field, f"the image has no pixels ({w} x {h})")
        if w * h > MAX_IMAGE_PIXELS:
            raise UserError(field, f"the image is {w} x {h} pixels ({w * h / 1e6:.0f} megapixels), over the "
                                   f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixel limit: downscale it first")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as im:  # reads the header only
                check_header(im)
                im.verify()  # structure and checksums, without decoding pixels
            with Image.open(path, formats=IMAGE_FORMATS) as im:  # verify() leaves the file unusable: reopen
                check_header(im)
                im.seek(0)  # animated GIF / WebP / multi-page TIFF: the first frame
                if im.format in ("JPEG", "MPO"):
                    im.draft("RGB", (DECODE_SIDE, DECODE_SIDE))  # DCT scaling: decode at 1/2, 1/4 or 1/8 size
                im.load()
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except UserError:
        raise
    except UnidentifiedImageError:
        raise UserError(field, f"not an image this container decodes; send one of {formats}")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(field, f"the image is too large to decode safely, over the {MAX_IMAGE_PIXELS / 1e6:.0f} "
                               f"megapixel limit ({e}): downscale it first")
    except Exception as e:  # truncated / corrupt data: OSError, SyntaxError, ValueError, struct.error, EOFError...
        raise UserError(field, f"the image is corrupt or truncated and cannot be decoded ({type(e).__name__}: "
                               f"{str(e)[:200]}); re-export it as PNG or JPEG")


def _to_rgb(im):
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))  # transparent areas read as white, not black
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits, don't clip
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        top = a.max() if a.size and a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


# -- captioning --------------------------------------------------------------------------------------------

class Captioner:
    """BLIP (`BlipForConditionalGeneration` + `BlipProcessor`) through transformers, beam search: deterministic."""

    def __init__(self, name: str, folder: Path, device: torch.device, dtype: torch.dtype):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.name = name
        self.device = device
        self.dtype = dtype
        self.processor = BlipProcessor.from_pretrained(folder)
        self.model = BlipForConditionalGeneration.from_pretrained(folder, dtype=dtype, use_safetensors=True)
        self.model = self.model.to(device).eval()

    def caption(self, image) -> str:
        inputs = self.processor(images=image, return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        with torch.inference_mode():
            out = self.model.generate(pixel_values=pixels, num_beams=3, max_new_tokens=24, do_sample=False)
        text = self.processor.decode(out[0], skip_special_tokens=True)
        text = " ".join(text.split())[:MAX_CAPTION_CHARS]
        return text or "an image"


def captioner_files_missing(folder: Path) -> list[str]:
    missing = writer_files_missing(folder)
    if not any((folder / n).is_file() for n in ("preprocessor_config.json", "processor_config.json")):
        missing.append("preprocessor_config.json")
    return missing


# -- the stage in front of the engines ----------------------------------------------------------------------

def _fetch_hint(name: str) -> str:
    return f"`script/download-weights {name}`"


class PromptStage:
    """Turns image2music / enhance_prompt requests into plain text requests before the engines see them."""

    def __init__(self, captioner: Optional[Captioner], writer: Optional[LMWriter], weights_dir: Path):
        self.captioner = captioner
        self.writer = writer
        self.template = TemplateWriter()
        self.weights_dir = weights_dir
        # one request at a time through the helpers: the writer seeds the global RNG (forked) while it samples
        self._lock = threading.Lock()

    @classmethod
    def load(cls, weights_dir: Path, wanted: Optional[list[str]], device: torch.device, dtype: torch.dtype,
             log: Callable[[str], None]) -> "PromptStage":
        """Load what is present (or, with COG_MUSIC_MODELS set, what it names; missing files then fail setup)."""
        from lib.service import SetupError

        loaded = {}
        for name, cls_, missing_fn in ((CAPTIONER, Captioner, captioner_files_missing),
                                       (WRITER, LMWriter, writer_files_missing)):
            extra = catalog.EXTRAS[name]
            folder = weights_dir / extra.folder
            if wanted is not None and name not in wanted:
                continue
            if wanted is None and not folder.is_dir():
                continue
            missing = ["the folder"] if not folder.is_dir() else missing_fn(folder)
            if missing:
                raise SetupError(f"{name}: {folder} is missing {', '.join(missing)}; fetch it with {_fetch_hint(name)}")
            t = time.perf_counter()
            try:
                loaded[name] = cls_(name, folder, device, dtype)
            except Exception as e:
                raise SetupError(f"{name}: loading {folder} failed: {type(e).__name__}: {e}") from e
            log(f"loaded {name} ({extra.feature}) from {folder} on {device} in {time.perf_counter() - t:.1f}s")
        return cls(loaded.get(CAPTIONER), loaded.get(WRITER), weights_dir)

    def prepare(self, req, loaded: dict, log: Callable[[str], None]):
        """The request the engines serve: `req` itself, or a text2music copy whose prompt was written here."""
        from lib.request import check_inputs, resolve_seed

        image_task = req.task == "image2music" or (req.task == "auto" and req.image is not None)
        if req.image is not None and not image_task:
            raise UserError("image", f"task {req.task} ignores image: remove it, or set task to image2music (or "
                                     "auto) to turn the image into music")
        if not image_task and not req.enhance_prompt:
            return req
        if image_task:
            if req.image is None:
                raise UserError("image", "task image2music needs an image: add one (PNG, JPEG, WebP, ...)")
            if req.input_audio is not None:
                raise UserError("input_audio", "image2music writes a text prompt from the image and generates from "
                                               "it; it takes no input_audio: remove it, or drop the image and use "
                                               "an audio task")
            if self.captioner is None:
                raise UserError("image", f"image2music needs the {CAPTIONER} captioner, which is not loaded in this "
                                         f"container: fetch it with {_fetch_hint(CAPTIONER)} and restart")
        prompt = (req.prompt or "").strip()
        if req.enhance_prompt:
            if self.writer is None:
                raise UserError("enhance_prompt", f"enhance_prompt needs the {WRITER} prompt writer, which is not "
                                                  f"loaded in this container: fetch it with {_fetch_hint(WRITER)} "
                                                  "and restart, or set enhance_prompt=false")
            if not image_task and not prompt:
                raise UserError("prompt", "enhance_prompt rewrites your prompt, and it is empty: write a few words "
                                          "(e.g. 'lofi beat'), or set enhance_prompt=false")

        seed = resolve_seed(req.seed)  # resolved here so the writer and the engine use (and log) the same one
        text_req = dataclasses.replace(req, image=None, enhance_prompt=False, seed=seed,
                                       task="text2music" if image_task else req.task,
                                       prompt=prompt or "music", extra=dict(req.extra))
        # every other input is checked now, before any model work (a 1-second caption is still a second)
        try:
            check_inputs(text_req, loaded)
        except UserError as e:
            if image_task and e.field == "task":
                able = [m.name for m in loaded.values() if "text2music" in catalog.tasks_of(m)]
                raise UserError("model_version", f"image2music generates from a text prompt, which "
                                                 f"{req.model_version} does not take; use a text-to-music model "
                                                 f"({', '.join(able) or 'none is loaded'})") from None
            raise

        image = load_image(req.image) if image_task else None
        with self._lock:
            written = self._write(text_req, image, prompt, seed, log)
        text_req.extra["original_prompt"] = req.prompt
        return dataclasses.replace(text_req, prompt=written)

    def _write(self, text_req, image, prompt: str, seed: int, log: Callable[[str], None]) -> str:
        if image is not None:
            t = time.perf_counter()
            caption = self.captioner.caption(image)
            log(f"image caption ({self.captioner.name}, {time.perf_counter() - t:.2f}s): {caption}")
            writer = self.writer or self.template
            t = time.perf_counter()
            written = writer.for_scene(caption, prompt or None, seed)
            if not written:
                log(f"{writer.name} wrote an empty prompt; using the template")
                writer = self.template
                written = writer.for_scene(caption, prompt or None, seed)
            how = writer.name if writer is self.template else f"{writer.name}, seed {seed}"
            if self.writer is None:
                how += f"; no language model loaded: fetch one with {_fetch_hint(WRITER)}"
            log(f"music prompt ({how}, {time.perf_counter() - t:.2f}s): {written}")
            text_req.extra["caption"] = caption
        else:
            t = time.perf_counter()
            written = self.writer.rewrite(prompt, seed)
            if not written:
                log(f"{self.writer.name} wrote an empty prompt; keeping yours")
                written = prompt
            log(f"enhanced prompt ({self.writer.name}, seed {seed}, {time.perf_counter() - t:.2f}s): {prompt!r} -> "
                f"{written}")
        return written
