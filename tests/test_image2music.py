"""Image to music and the prompt writer (lib.image2music, lib.prompt_writer) on the tiny random BLIP and LM:
through the predictor and the real HTTP server; untrusted images; what setup loads; the template fallback."""
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import predict, read_audio
from lib import catalog, image2music, prompt_writer
from lib.errors import UserError
from lib.image2music import PromptStage, load_image
from lib.local_server import file_to_data_uri
from lib.params import PARAMS
from lib.request import Request


def _png(path: Path, w: int = 96, h: int = 64, seed: int = 0, mode: str = "RGB") -> Path:
    from PIL import Image

    rng = np.random.RandomState(seed)
    if mode == "RGBA":
        Image.fromarray(rng.randint(0, 255, (h, w, 4), dtype=np.uint8), "RGBA").save(path)
    else:
        Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode).save(path)
    return path


def _png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG whose header claims w x h pixels, with a few bytes of data: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models run a few hundred microsecond-sized ops per token: on a shared 2-core machine, OpenMP
    threads waiting on each other make that ~100x slower than one thread. The predictor's results don't change."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("images")
    good = _png(d / "scene.png")
    truncated = d / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = d / "notes.png"
    text.write_text("this is not an image, whatever its name says\n")
    empty = d / "empty.png"
    empty.write_bytes(b"")
    return {"good": good, "other": _png(d / "other.png", seed=1), "truncated": truncated, "not_an_image": text,
            "empty": empty, "huge": _png_header_only(d / "huge.png", 100_000, 100_000)}


@pytest.fixture(scope="module")
def stage(predictor) -> PromptStage:
    return predictor.service.prompts


def _logs():
    lines = []
    return lines, lines.append


# -- through the predictor --------------------------------------------------------------------------------

def test_image_to_music_through_the_predictor_logs_caption_and_prompt(predictor, stage, images, capsys):
    out = predict(predictor, image=images["good"], duration=1.5, model_version="small", seed=11)
    audio, sr = read_audio(out)
    assert sr == 32000 and abs(audio.shape[1] / sr - 1.5) < 0.03
    log = capsys.readouterr().out
    # the logged caption and prompt are what the captioner and the LM give for this image and seed
    caption = stage.captioner.caption(load_image(images["good"]))
    written = stage.writer.for_scene(caption, None, 11)
    assert f"image caption ({image2music.CAPTIONER}" in log and caption in log
    assert f"music prompt ({image2music.WRITER}, seed 11" in log and written in log
    assert "task: text2music, model_version: small, seed: 11" in log


def test_auto_task_with_an_image_is_image2music_and_a_prompt_is_passed_on_as_a_wish(stage, predictor, images):
    lines, log = _logs()
    req = stage.prepare(Request(image=images["good"], prompt="jazz", seed=4), predictor.service.specs, log)
    assert (req.task, req.image, req.enhance_prompt, req.seed) == ("text2music", None, False, 4)
    caption = req.extra["caption"]
    assert req.prompt == stage.writer.for_scene(caption, "jazz", 4) != stage.writer.for_scene(caption, None, 4)
    assert req.extra["original_prompt"] == "jazz"


def test_different_images_give_different_captions(stage, images):
    assert stage.captioner.caption(load_image(images["good"])) != stage.captioner.caption(load_image(images["other"]))


def test_enhance_prompt_is_reproducible_by_seed(predictor, stage, capsys):
    specs = predictor.service.specs
    rewritten = {s: stage.prepare(Request(prompt="lofi beat", enhance_prompt=True, seed=s), specs, print).prompt
                 for s in (1, 2, 3)}
    assert rewritten[1] == stage.prepare(Request(prompt="lofi beat", enhance_prompt=True, seed=1), specs,
                                         print).prompt
    assert len(set(rewritten.values())) > 1, "the seed should change the LM's sampling"
    assert all(p and p != "lofi beat" for p in rewritten.values())
    capsys.readouterr()
    out = predict(predictor, prompt="lofi beat", enhance_prompt=True, duration=1, model_version="small", seed=2)
    assert read_audio(out)[0].shape[1] == 32000
    log = capsys.readouterr().out
    assert f"enhanced prompt ({image2music.WRITER}, seed 2" in log and rewritten[2] in log


def test_the_writer_leaves_the_engines_random_state_alone(stage):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    stage.writer.rewrite("calm piano", 9)
    assert torch.equal(torch.rand(3), expected)


def test_without_a_language_model_a_deterministic_template_writes_the_prompt(stage, predictor, images):
    no_lm = PromptStage(stage.captioner, None, stage.weights_dir)
    lines, log = _logs()
    a = no_lm.prepare(Request(image=images["good"], seed=1), predictor.service.specs, log)
    b = no_lm.prepare(Request(image=images["good"], seed=2), predictor.service.specs, log)
    assert a.prompt == b.prompt and "BPM" in a.prompt and a.extra["caption"] in a.prompt
    assert any("music prompt (template" in ln and f"script/download-weights {image2music.WRITER}" in ln
               for ln in lines)


@pytest.mark.parametrize("caption,genre,bpm", [
    ("a crowd of people dancing at a party", "house", 124),
    ("two dogs playing on the beach", "tropical chill", 100),  # first matching style wins
    ("a snowy mountain in the fog", "acoustic folk", 95),
    ("an empty white wall", "cinematic ambient", 90),
])
def test_template_styles(caption, genre, bpm):
    p = prompt_writer.TemplateWriter().for_scene(caption, None, 0)
    assert genre in p and f"{bpm} BPM" in p and caption in p


def test_clean_keeps_one_short_line_without_labels_or_quotes():
    assert prompt_writer.clean('Prompt: "Upbeat funk with slap bass, 110 BPM."\nHope this helps!') == \
        "Upbeat funk with slap bass, 110 BPM."
    long = prompt_writer.clean("word " * 500)
    assert len(long) <= prompt_writer.MAX_PROMPT_CHARS and not long.endswith(" ")
    assert prompt_writer.clean("\x00\x07  \n\n") == ""


# -- what is refused ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,words", [
    ("truncated", "corrupt or truncated"),
    ("not_an_image", "not an image"),
    ("empty", "empty"),
    ("huge", "megapixel limit"),
])
def test_bad_images_are_refused_naming_image(predictor, images, kind, words):
    with pytest.raises(UserError) as e:
        predict(predictor, image=images[kind], duration=1, model_version="small")
    assert e.value.field == "image" and words in e.value.message


def test_image_with_a_task_that_ignores_it(predictor, images):
    with pytest.raises(UserError) as e:
        predict(predictor, image=images["good"], prompt="x", task="text2music", duration=1)
    assert e.value.field == "image" and "image2music" in e.value.message


def test_image2music_without_an_image_or_with_input_audio(predictor, images, tone_wav):
    with pytest.raises(UserError) as e:
        predict(predictor, task="image2music", duration=1)
    assert e.value.field == "image" and "needs an image" in e.value.message
    with pytest.raises(UserError) as e:
        predict(predictor, image=images["good"], input_audio=tone_wav, duration=1)
    assert e.value.field == "input_audio"


def test_image2music_on_a_model_without_text_prompts_names_model_version(predictor, images):
    assert "dance-diffusion-maestro" in predictor.service.specs
    with pytest.raises(UserError) as e:
        predict(predictor, image=images["good"], model_version="dance-diffusion-maestro", duration=1)
    assert e.value.field == "model_version" and "text-to-music" in e.value.message


def test_other_inputs_are_checked_before_any_captioning(predictor, images, capsys):
    with pytest.raises(UserError) as e:
        predict(predictor, image=images["good"], model_version="small", continuation_start=2)
    assert e.value.field == "continuation_start"
    assert "image caption" not in capsys.readouterr().out


def test_enhance_prompt_needs_a_prompt(predictor):
    with pytest.raises(UserError) as e:
        predict(predictor, enhance_prompt=True, duration=1, model_version="small")
    assert e.value.field == "prompt"


def test_missing_helpers_give_errors_naming_the_fetch_command(predictor, images):
    empty = PromptStage(None, None, Path("."))
    with pytest.raises(UserError) as e:
        empty.prepare(Request(image=images["good"]), predictor.service.specs, print)
    assert e.value.field == "image" and f"script/download-weights {image2music.CAPTIONER}" in e.value.message
    with pytest.raises(UserError) as e:
        empty.prepare(Request(prompt="rock", enhance_prompt=True), predictor.service.specs, print)
    assert e.value.field == "enhance_prompt" and f"script/download-weights {image2music.WRITER}" in e.value.message


# -- decoding images ------------------------------------------------------------------------------------------

def test_images_in_every_mode_and_format_decode_to_rgb(tmp_path):
    from PIL import Image

    rgba = _png(tmp_path / "a.png", mode="RGBA")
    gray = _png(tmp_path / "g.png", mode="L")
    pal = _png(tmp_path / "p.png", mode="P")
    jpeg = tmp_path / "big.jpg"
    Image.fromarray(np.zeros((3000, 4000, 3), dtype=np.uint8)).save(jpeg, quality=50)
    gif = tmp_path / "anim.gif"
    frames = [Image.new("P", (20, 10), c) for c in (1, 2)]
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    webp = tmp_path / "x.webp"
    Image.new("RGB", (30, 20), (10, 200, 30)).save(webp)
    deep = tmp_path / "d16.png"
    Image.fromarray((np.arange(64 * 32).reshape(32, 64) * 30).astype(np.uint16)).save(deep)
    for path in (rgba, gray, pal, jpeg, gif, webp, deep):
        im = load_image(path)
        assert im.mode == "RGB", path
    assert max(load_image(jpeg).size) <= 2000  # decoded at reduced scale: the captioner sees 384 px anyway
    transparent = tmp_path / "t.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(transparent)
    assert load_image(transparent).getpixel((0, 0)) == (255, 255, 255)
    assert np.asarray(load_image(deep)).max() > 200  # 16-bit scaled to 8 bits, not clipped to white
    rotated = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    Image.new("RGB", (40, 20)).save(rotated, exif=exif)
    assert load_image(rotated).size == (20, 40)


def test_image_limits_match_the_input_description():
    desc = PARAMS["image"].description
    assert f"{image2music.MAX_IMAGE_BYTES // 2**20} MiB" in desc
    assert f"{image2music.MAX_IMAGE_PIXELS // 10**6} megapixels" in desc


def test_too_many_bytes_is_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(image2music, "MAX_IMAGE_BYTES", 100)
    with pytest.raises(UserError) as e:
        load_image(_png(tmp_path / "x.png"))
    assert e.value.field == "image" and "MiB limit" in e.value.message


# -- setup ---------------------------------------------------------------------------------------------------

def test_setup_loads_helpers_when_present_and_only_when_named(tiny_weights, monkeypatch):
    from lib.service import Service, SetupError, resolve_models

    assert catalog.EXTRAS[image2music.CAPTIONER].folder and catalog.EXTRAS[image2music.WRITER].repo
    monkeypatch.setenv("COG_MUSIC_MODELS", f"small,{image2music.CAPTIONER}")
    service = Service(weights_dir=tiny_weights)
    assert set(service.engines) == {"small"}
    assert service.prompts.captioner is not None and service.prompts.writer is None
    with pytest.raises(SetupError) as e:
        resolve_models(tiny_weights, [image2music.WRITER])
    assert "no music model" in str(e.value)


def test_a_named_helper_that_is_missing_fails_setup_with_the_fetch_command(tmp_path):
    from lib.service import SetupError

    with pytest.raises(SetupError) as e:
        PromptStage.load(tmp_path, [image2music.WRITER], torch.device("cpu"), torch.float32, print)
    assert f"script/download-weights {image2music.WRITER}" in str(e.value)
    assert PromptStage.load(tmp_path, None, torch.device("cpu"), torch.float32, print).captioner is None


# -- through the HTTP server ------------------------------------------------------------------------------

@pytest.fixture
def ready(server):
    server.wait_ready(60)
    yield server
    server.wait_ready(60)


def test_http_image_to_music(ready, images):
    import io

    import soundfile

    from lib.local_server import data_uri_to_bytes

    status, body = ready.predict({"image": file_to_data_uri(images["good"], "image/png"), "duration": 1.5,
                                  "model_version": "small", "seed": 11, "output_format": "flac"})
    assert status == 200 and body["status"] == "succeeded", body
    audio, sr = soundfile.read(io.BytesIO(data_uri_to_bytes(body["output"])), always_2d=True)
    assert sr == 32000 and abs(audio.shape[0] / sr - 1.5) < 0.03
    caption = re.search(r"image caption \([^)]*\): (.+)", body["logs"]).group(1)
    assert caption.strip()
    assert re.search(rf"music prompt \({re.escape(image2music.WRITER)}, seed 11", body["logs"])


@pytest.mark.parametrize("kind", ["truncated", "not_an_image", "huge", "empty"])
def test_http_bad_images_fail_naming_image(ready, images, kind):
    status, body = ready.predict({"image": file_to_data_uri(images[kind], "image/png"), "duration": 1,
                                  "model_version": "small"})
    assert status == 200 and body["status"] == "failed", body
    assert "UserError: image: " in body["error"], body["error"]


def test_http_image_with_text2music_is_refused(ready, images):
    status, body = ready.predict({"image": file_to_data_uri(images["good"], "image/png"), "prompt": "x",
                                  "task": "text2music", "duration": 1, "model_version": "small"})
    assert status == 200 and body["status"] == "failed"
    assert "image" in body["error"] and "image2music" in body["error"]


def test_download_weights_knows_the_helpers(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run([sys.executable, str(ROOT / "script/download-weights"), image2music.WRITER, "--dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2",
                              "HF_HOME": str(tmp_path / "hf")})
    assert out.returncode != 0
    assert f"could not fetch {catalog.EXTRAS[image2music.WRITER].repo}" in out.stderr
