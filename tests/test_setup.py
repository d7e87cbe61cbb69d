"""Setup and packaging: which models load, what a missing or corrupt checkpoint says, cog.yaml, the scripts."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, read_audio
from lib.local_server import LocalServer, ServerError
from lib.service import Service, SetupError


def test_cog_yaml_is_valid_for_cog_and_pins_the_sdk_we_test_with():
    import jsonschema
    import yaml

    config = yaml.safe_load((ROOT / "cog.yaml").read_text())
    jsonschema.validate(config, json.loads((ROOT / "tests/data/cog_yaml_schema_v1.0.json").read_text()))
    assert config["build"]["gpu"] is True
    assert config["build"]["python_version"] == "3.12"
    assert "ffmpeg" in config["build"]["system_packages"]
    assert config["predict"] == "predict.py:Predictor"
    pinned = re.search(r"^cog==([\d.]+)$", (ROOT / "requirements-dev.txt").read_text(), re.M).group(1)
    assert config["build"]["sdk_version"] == pinned
    assert (ROOT / config["build"]["python_requirements"]).is_file()


def test_models_env_selects_what_loads(tiny_weights, monkeypatch):
    monkeypatch.setenv("COG_MUSIC_MODELS", "small, stereo-small")
    service = Service(weights_dir=tiny_weights)
    assert set(service.engines) == {"small", "stereo-small"}


def test_missing_model_names_the_folder_and_the_fetch_command(tiny_weights, monkeypatch):
    monkeypatch.setenv("COG_MUSIC_MODELS", "small,large")
    with pytest.raises(SetupError) as e:
        Service(weights_dir=tiny_weights)
    assert "musicgen-large" in str(e.value) and "script/download-weights large" in str(e.value)


def test_empty_weights_folder_says_how_to_get_weights(tmp_path, monkeypatch):
    monkeypatch.delenv("COG_MUSIC_MODELS", raising=False)
    with pytest.raises(SetupError) as e:
        Service(weights_dir=tmp_path)
    assert "script/download-weights" in str(e.value) and "script/make-tiny-weights" in str(e.value)


def test_incomplete_checkpoint_names_the_missing_file(tiny_weights, tmp_path, monkeypatch):
    shutil.copytree(tiny_weights / "musicgen-small", tmp_path / "musicgen-small")
    (tmp_path / "musicgen-small" / "model.safetensors").unlink()
    monkeypatch.delenv("COG_MUSIC_MODELS", raising=False)
    with pytest.raises(SetupError) as e:
        Service(weights_dir=tmp_path)
    assert "model.safetensors" in str(e.value) and "script/download-weights small" in str(e.value)


def test_corrupt_checkpoint_fails_setup_over_http_naming_the_model(tiny_weights, tmp_path):
    shutil.copytree(tiny_weights / "musicgen-small", tmp_path / "musicgen-small")
    weights = tmp_path / "musicgen-small" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated download
    server = LocalServer(weights=tmp_path, env={"COG_MUSIC_MODELS": ""})
    with pytest.raises(ServerError) as e:
        server.start()
    server.stop()
    assert "SETUP_FAILED" in str(e.value) or "setup failed" in str(e.value)
    assert "musicgen-small" in str(e.value)


def test_make_tiny_weights_writes_loadable_folders(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "script/make-tiny-weights"), str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for name in ("musicgen-small", "musicgen-stereo-small", "musicgen-melody", "musicgen-stereo-melody"):
        assert (tmp_path / name / "config.json").is_file()
        assert (tmp_path / name / "model.safetensors").is_file()
        assert (tmp_path / name / "tokenizer.json").is_file()


def test_download_weights_fails_clearly_without_a_hub(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "script/download-weights"), "small", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2",
                              "HF_HOME": str(tmp_path / "hf")})
    assert out.returncode != 0
    assert "could not fetch facebook/musicgen-small" in out.stderr


SEED_003_INPUTS = dict(prompt="edm with a drexciya vibe", duration=3, continuation=True, continuation_start=0,
                       continuation_end=1, multi_band_diffusion=False, normalization_strategy="peak", top_k=250,
                       top_p=0, temperature=1, classifier_free_guidance=3, output_format="mp3", seed=42)


def test_script_predict_answers_the_full_seed_003_input_set(tiny_weights, tone_wav, tmp_path):
    out = tmp_path / "out.mp3"
    args = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in SEED_003_INPUTS.items()]
    cmd = [sys.executable, str(ROOT / "script/predict"), "--weights", str(tiny_weights), "-o", str(out),
           "-i", f"input_audio=@{tone_wav}"]
    for a in args:
        cmd += ["-i", a]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    audio, sr = read_audio(out)
    assert sr == 32000 and abs(audio.shape[1] / sr - 3.0) < 0.06
    assert "seed: 42" in res.stderr


def test_script_predict_exits_nonzero_with_the_servers_message(tiny_weights, tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "script/predict"), "--weights", str(tiny_weights),
                          "-i", "prompt=x", "-i", "duration=2", "-i", "model_version=medium"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 1
    assert "script/download-weights medium" in res.stderr
    res = subprocess.run([sys.executable, str(ROOT / "script/predict"), "--weights", str(tiny_weights),
                          "-i", "top_k=-3"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 2 and "top_k" in res.stderr
    assert not list(Path(tmp_path).glob("output.*"))
