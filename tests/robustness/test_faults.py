"""Faults and load: out-of-memory, busy server, concurrent predictions, temp files, memory over many runs."""
import os
import threading
import time

import pytest
import torch

from conftest import predict
from lib.errors import UserError


def test_out_of_memory_is_a_failed_prediction_and_the_next_one_works(predictor, monkeypatch):
    engine = predictor.service.engines["small"]
    calls = []
    original = engine.generate

    def oom_once(job):
        calls.append(job)
        if len(calls) == 1:
            held = torch.empty(10_000_000)  # what a real OOM leaves behind must be released
            del held
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(job)

    monkeypatch.setattr(engine, "generate", oom_once)
    with pytest.raises(UserError) as e:
        predict(predictor, prompt="x", duration=2, model_version="small")
    assert e.value.field == "duration" and "out of memory" in str(e.value)
    assert predict(predictor, prompt="x", duration=1, model_version="small").exists()


def test_second_request_while_busy_gets_409_then_succeeds(server):
    server.wait_ready(60)
    status, _ = server.request("POST", "/predictions", {"input": {"prompt": "x", "duration": 20,
                                                                  "model_version": "small"}, "id": "busy-1"},
                               headers={"Prefer": "respond-async"})
    assert status == 202
    deadline = time.monotonic() + 30
    while server.health().get("status") != "BUSY" and time.monotonic() < deadline:
        time.sleep(0.05)
    status, body = server.predict({"prompt": "y", "duration": 1, "model_version": "small"})
    assert status == 409, (status, body)
    server.request("POST", "/predictions/busy-1/cancel")
    server.wait_ready(60)
    status, body = server.predict({"prompt": "y", "duration": 1, "model_version": "small"})
    assert body["status"] == "succeeded"
    server.wait_ready(60)


def test_concurrent_predictions_never_share_an_output_file(predictor):
    paths, errors = [], []

    def run():
        try:
            paths.append(predict(predictor, prompt="x", duration=1, model_version="small", seed=1))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert len(set(paths)) == 4 and all(p.exists() for p in paths)


def test_old_outputs_are_removed(predictor):
    from lib import service

    first = predict(predictor, prompt="x", duration=1, model_version="small")
    old = time.time() - service.OUTPUT_MAX_AGE_S - 10
    os.utime(first.parent, (old, old))
    predict(predictor, prompt="x", duration=1, model_version="small")
    assert not first.parent.exists()


def _rss_mb() -> float:
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed arenas back, so RSS shows what is really held
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_memory_does_not_grow_over_200_predictions(predictor, tone_wav, capsys):
    """A leak grows with every prediction; warm-up (allocator pools, caches, first-use of each path) does
    not. So: warm up, then compare the growth over predictions 1-100 and 101-200."""
    kinds = [dict(prompt="a", model_version="small"), dict(prompt="b", model_version="stereo-small"),
             dict(prompt="c", model_version="melody", input_audio=tone_wav),
             dict(prompt="d", model_version="small", input_audio=tone_wav, continuation=True, continuation_end=0.5)]

    def one(i):  # mostly the cheapest request; every 10th exercises audio input, stereo and encoders
        kind = kinds[(i // 10) % 4] if i % 10 == 0 else kinds[0]
        predict(predictor, duration=1, seed=i, output_format=("wav", "mp3", "flac")[i % 3], **kind)

    for i in range(40):  # warm up every path used below
        one(i)
    rss = [_rss_mb()]
    for i in range(200):
        one(i)
        if i in (99, 199):
            rss.append(_rss_mb())
    capsys.readouterr()
    print(f"RSS after warm-up {rss[0]:.0f} MiB, after 100 predictions {rss[1]:.0f}, after 200 {rss[2]:.0f}")
    assert rss[2] - rss[1] < 10, rss  # 100 KiB kept per prediction would show as 10 MiB here
    assert rss[2] - rss[0] < 40, rss
