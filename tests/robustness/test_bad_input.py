"""Strangers' input against the real HTTP server: every bad file and value gets a 422 or a failed
prediction that names the input and says what to do; the server stays READY; the next request works."""
import json
import math
import struct
import subprocess
import time

import numpy as np
import pytest

from conftest import make_tone
from lib.local_server import file_to_data_uri
from lib.params import PARAMS


def check_refused(server, status, body, field):
    """422 naming `field`, or a failed prediction whose error names it; then the server is READY again."""
    if status == 422:
        assert any(d["loc"][-1] == field for d in body["detail"]), body
    else:
        assert status == 200 and body["status"] == "failed", body
        assert field in body["error"], body["error"]
    server.wait_ready(60)


@pytest.fixture(scope="module")
def files(audio_dir):
    """A zoo of hostile or odd input files, built once."""
    d = audio_dir / "zoo"
    d.mkdir(exist_ok=True)
    f = {}
    f["empty.wav"] = d / "empty.wav"
    f["empty.wav"].write_bytes(b"")
    good = make_tone(d / "good.wav", seconds=2)
    f["header_only.wav"] = d / "header_only.wav"
    f["header_only.wav"].write_bytes(good.read_bytes()[:44])
    mp3 = make_tone(d / "good.mp3", seconds=2)
    f["truncated.mp3"] = d / "truncated.mp3"
    f["truncated.mp3"].write_bytes(mp3.read_bytes()[:60])
    f["random.bin"] = d / "random.bin"
    f["random.bin"].write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    f["text.wav"] = d / "text.wav"
    f["text.wav"].write_text("this is not audio\n" * 100)
    f["video_only.mp4"] = d / "video_only.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc=d=1:s=32x32:r=5", "-c:v", "mpeg4", str(f["video_only.mp4"])], check=True)
    f["concat.wav"] = d / "concat.wav"
    f["concat.wav"].write_text(f"ffconcat version 1.0\nfile '{good}'\nfile 'http://127.0.0.1:9/x.wav'\n")
    f["playlist.m3u8"] = d / "playlist.m3u8"
    f["playlist.m3u8"].write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\nfile://{good}\n"
                                  "#EXTINF:2,\nhttp://127.0.0.1:9/x.ts\n#EXT-X-ENDLIST\n")
    f["hour.ogg"] = d / "hour.ogg"  # one hour of quiet noise, tiny on disk
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "anoisesrc=d=3600:r=8000:a=0.001", "-c:a", "libvorbis", "-q:a", "-1", str(f["hour.ogg"])],
                   check=True)
    for name, value in (("nan", math.nan), ("inf", math.inf)):
        path = d / f"{name}.wav"
        samples = np.full(16000, 0.1, dtype=np.float32)
        samples[100] = value
        _write_float_wav(path, samples, 16000)
        f[f"{name}.wav"] = path
    return f


def _write_float_wav(path, samples, rate):
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)  # WAVE_FORMAT_IEEE_FLOAT, mono
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


@pytest.mark.parametrize("name", ["empty.wav", "header_only.wav", "truncated.mp3", "random.bin", "text.wav",
                                  "video_only.mp4", "concat.wav", "playlist.m3u8", "nan.wav", "inf.wav"])
@pytest.mark.parametrize("task", ["continuation", "melody"])
def test_bad_audio_files_are_refused(server, files, name, task):
    server.wait_ready(60)
    inputs = {"prompt": "x", "duration": 2, "input_audio": file_to_data_uri(files[name])}
    inputs.update({"continuation": True, "model_version": "small"} if task == "continuation"
                  else {"model_version": "melody"})
    status, body = server.predict(inputs)
    check_refused(server, status, body, "input_audio")


def test_playlist_and_concat_never_touch_their_targets(files):
    """The entries point at a local file and a URL: decoding must fail before reading either."""
    from lib import audio
    from lib.errors import UserError

    for name in ("concat.wav", "playlist.m3u8"):
        with pytest.raises(UserError) as e:
            audio.load_audio(files[name], 32000, 1)
        assert "could not be decoded" in str(e.value)


def test_one_hour_file_is_refused_quickly(server, files):
    server.wait_ready(60)
    t = time.monotonic()
    status, body = server.predict({"prompt": "x", "duration": 2, "input_audio": file_to_data_uri(files["hour.ogg"]),
                                   "continuation": True, "model_version": "small"})
    check_refused(server, status, body, "input_audio")
    assert "600 s" in body["error"]
    assert time.monotonic() - t < 60


@pytest.mark.parametrize("rate,channels", [(8000, 1), (192000, 2), (384000, 1), (44100, 8)])
def test_odd_but_valid_audio_is_resampled_and_mixed(server, audio_dir, rate, channels):
    server.wait_ready(60)
    path = make_tone(audio_dir / f"odd-{rate}-{channels}.wav", seconds=1.5, rate=rate, channels=channels)
    status, body = server.predict({"prompt": "x", "duration": 2, "input_audio": file_to_data_uri(path),
                                   "continuation": True, "model_version": "stereo-small"})
    assert status == 200 and body["status"] == "succeeded", body
    server.wait_ready(60)


NUMERIC = {n: p for n, p in PARAMS.items() if p.type in (int, float) or str(p.type) in (
    "typing.Optional[int]", "typing.Optional[float]")}


@pytest.mark.parametrize("name", sorted(NUMERIC))
def test_numbers_past_their_bounds_get_422(server, name):
    p = NUMERIC[name]
    server.wait_ready(60)
    for value in [v for v in (None if p.ge is None else p.ge - 1, None if p.le is None else p.le + 1) if v is not None]:
        status, body = server.predict({"prompt": "x", "duration": 1, "model_version": "small", name: value})
        assert status == 422, (name, value, body)
        assert body["detail"][0]["loc"][-1] == name


@pytest.mark.parametrize("name", sorted(NUMERIC))
def test_numbers_at_their_bounds_succeed_or_explain(server, name):
    p = NUMERIC[name]
    for value in [v for v in (p.ge, p.le) if v is not None]:
        if name == "duration" and value > 10:
            continue  # 300 s works (windowed extension) but takes minutes on a CPU
        server.wait_ready(60)
        value = int(value) if "int" in str(p.type) else value
        status, body = server.predict({"prompt": "x", "duration": 1, "model_version": "small", name: value})
        assert status == 200, (name, value, body)
        if body["status"] != "succeeded":
            assert name in body["error"] or "continuation" in body["error"], (name, value, body["error"])


@pytest.mark.parametrize("raw", ['{"input": {"duration": NaN}}', '{"input": {"temperature": Infinity}}',
                                 '{"input": {"top_p": -Infinity}}', '{"input": ', 'null', '[]'])
def test_non_json_numbers_and_broken_bodies_do_not_break_the_server(server, raw):
    import urllib.error
    import urllib.request

    server.wait_ready(60)
    req = urllib.request.Request(server.url + "/predictions", data=raw.encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, body = resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    assert 400 <= status < 500 or (status == 200 and body.get("status") == "failed"), (status, body)
    server.wait_ready(60)


def test_huge_prompt_is_422_and_long_prompt_is_truncated(server):
    server.wait_ready(60)
    status, body = server.predict({"prompt": "a" * (PARAMS["prompt"].max_length + 1), "duration": 1})
    assert status == 422 and body["detail"][0]["loc"][-1] == "prompt"
    status, body = server.predict({"prompt": "jazz piano " * 350, "duration": 1, "model_version": "small"})
    assert body["status"] == "succeeded", body
    assert "prompt truncated" in body["logs"]
    server.wait_ready(60)


@pytest.mark.parametrize("prompt", ["🎵 ñandú — 音楽 ♫", "tab\tnew\nline\x00nul\x07bell\x1b[31m", "\u202eRTL", " "])
def test_unicode_and_control_characters_in_prompts(server, prompt):
    server.wait_ready(60)
    status, body = server.predict({"prompt": prompt, "duration": 1, "model_version": "small", "seed": 1})
    assert status == 200 and body["status"] == "succeeded", body
    server.wait_ready(60)


@pytest.mark.parametrize("window,field", [
    (dict(continuation_start=1.5, continuation_end=0.5), "continuation_end"),  # reversed
    (dict(continuation_start=-1), "continuation_start"),  # negative
    (dict(continuation_end=-2), "continuation_end"),
    (dict(continuation_start=50), "continuation_start"),  # past the end
    (dict(continuation_end=50, duration=60), "continuation_end"),
    (dict(continuation_start=0, continuation_end=1.0, duration=1.0), "continuation_end"),  # no room left
])
def test_bad_continuation_windows(server, tone_wav, window, field):
    server.wait_ready(60)
    inputs = {"prompt": "x", "duration": 3, "continuation": True, "model_version": "small",
              "input_audio": file_to_data_uri(tone_wav), **window}
    status, body = server.predict(inputs)
    check_refused(server, status, body, field)


def test_after_all_that_a_valid_prediction_succeeds(server):
    server.wait_ready(60)
    status, body = server.predict({"prompt": "lofi", "duration": 1.5, "model_version": "small"})
    assert body["status"] == "succeeded"
