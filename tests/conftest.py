"""Shared fixtures: tiny random weights built once per session, a Predictor on them, the real HTTP server,
and input audio files made with ffmpeg."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib.params import DEFAULTS  # noqa: E402


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    from lib import tiny

    root = tmp_path_factory.mktemp("weights")
    tiny.write_all(root)
    return root


@pytest.fixture(scope="session")
def predictor(tiny_weights):
    from predict import Predictor

    p = Predictor()
    p.setup(str(tiny_weights))
    return p


def predict(predictor, **inputs) -> Path:
    """Call predict() as cog does: every input given, defaults for the rest."""
    return Path(predictor.predict(**{**DEFAULTS, **inputs}))


def read_audio(path) -> tuple[np.ndarray, int]:
    """(channels, samples) float, sample rate."""
    import soundfile

    data, sr = soundfile.read(str(path), always_2d=True, dtype="float32")
    return data.T, sr


@pytest.fixture(scope="session")
def server(tiny_weights, tmp_path_factory):
    from lib.local_server import LocalServer

    log = tmp_path_factory.mktemp("server") / "server.log"
    s = LocalServer(weights=tiny_weights, log_file=log)
    s.start()
    yield s
    s.stop()


def make_tone(path: Path, seconds: float = 3.0, rate: int = 44100, channels: int = 1, freq: float = 440.0,
              extra: tuple = ()) -> Path:
    """A sine tone in whatever container/codec the extension implies, written by ffmpeg."""
    layout = {1: "mono", 2: "stereo"}.get(channels)
    filt = f"sine=f={freq}:d={seconds}:r={rate}"
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", filt]
    if layout:
        cmd += ["-ac", str(channels)]
    else:
        cmd += ["-af", f"aformat=channel_layouts={channels}c"]
    subprocess.run(cmd + list(extra) + [str(path)], check=True)
    return path


@pytest.fixture(scope="session")
def audio_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audio")


@pytest.fixture(scope="session")
def tone_wav(audio_dir) -> Path:
    return make_tone(audio_dir / "tone.wav", seconds=4.0, rate=44100, channels=2)

