"""The real Cog HTTP server (coglet) on tiny weights: health, schema, sync and async predictions, webhooks,
validation (422), failed predictions, cancel — and the server stays READY through all of it."""
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest

from lib.local_server import data_uri_to_bytes, file_to_data_uri
from lib.params import PARAMS


@pytest.fixture
def ready(server):
    server.wait_ready(60)
    yield server
    server.wait_ready(60)  # every test leaves the server healthy


def decode_output(body) -> tuple[np.ndarray, int]:
    import soundfile

    data, sr = soundfile.read(io.BytesIO(data_uri_to_bytes(body["output"])), always_2d=True, dtype="float32")
    return data.T, sr


class WebhookReceiver:
    """A local HTTP endpoint collecting the webhook POSTs the server sends."""

    def __init__(self):
        self.events: list[dict] = []
        self.done = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.events.append(body)
                if body.get("status") in ("succeeded", "failed", "canceled"):
                    receiver.done.set()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def webhook():
    r = WebhookReceiver()
    yield r
    r.close()


def test_health_is_ready_with_setup_logs_naming_the_models(ready):
    h = ready.health()
    assert h["status"] == "READY"
    assert "loaded small" in h["setup"]["logs"]


def test_openapi_lists_every_input_with_its_default_range_and_choices(ready):
    status, schema = ready.request("GET", "/openapi.json")
    assert status == 200
    comps = schema["components"]["schemas"]
    props = comps["Input"]["properties"]
    assert set(props) == set(PARAMS)
    for name, p in PARAMS.items():
        prop = props[name]
        if p.default is not None:
            assert prop["default"] == p.default, name
        if p.ge is not None:
            assert prop["minimum"] == p.ge, name
        if p.le is not None:
            assert prop["maximum"] == p.le, name
        if p.choices is not None:
            ref = (prop.get("allOf") or prop["anyOf"])[0]["$ref"].rsplit("/", 1)[1]
            assert comps[ref]["enum"] == list(p.choices), name
        assert prop["description"] == p.description
    assert props["input_audio"]["format"] == "uri"
    # Replicate's MusicGen names and defaults are all there (existing clients keep working)
    for name, default in dict(duration=8, top_k=250, top_p=0, temperature=1, classifier_free_guidance=3,
                              output_format="wav", normalization_strategy="loudness", continuation=False,
                              continuation_start=0, multi_band_diffusion=False).items():
        assert props[name]["default"] == default


def test_null_means_not_given_as_replicate_clients_send_it(ready):
    status, body = ready.predict({"prompt": "x", "duration": 1, "model_version": "small", "seed": None,
                                  "continuation_end": None, "input_audio": None})
    assert status == 200 and body["status"] == "succeeded", body
    assert re.search(r"seed: \d+", body["logs"])  # a random seed was drawn and reported
    status, body = ready.predict({"prompt": "x", "duration": None})
    assert status == 422 and body["detail"][0]["loc"][-1] == "duration"  # not optional: null is refused


def test_sync_prediction_returns_the_audio(ready):
    status, body = ready.predict({"prompt": "lofi beat", "duration": 2, "model_version": "stereo-small",
                                  "seed": 3})
    assert status == 200 and body["status"] == "succeeded", body
    audio, sr = decode_output(body)
    assert (sr, audio.shape) == (32000, (2, 64000))
    assert "seed: 3" in body["logs"] and "100/100 frames" in body["logs"]


def test_sync_prediction_with_an_uploaded_audio_file(ready, tone_wav):
    status, body = ready.predict({"prompt": "jazz", "duration": 3, "model_version": "small", "continuation": True,
                                  "continuation_end": 1.5, "input_audio": file_to_data_uri(tone_wav, "audio/wav"),
                                  "output_format": "mp3"})
    assert status == 200 and body["status"] == "succeeded", body
    assert body["output"].startswith("data:audio/mpeg")


@pytest.mark.parametrize("inputs,field", [
    ({"duration": 301}, "duration"),
    ({"duration": "long"}, "duration"),
    ({"top_p": 1.5}, "top_p"),
    ({"output_format": "aiff"}, "output_format"),
    ({"model_version": "gpt-5"}, "model_version"),
    ({"classifier_free_guidance": 0.5}, "classifier_free_guidance"),
])
def test_out_of_range_inputs_get_422_naming_the_field(ready, inputs, field):
    status, body = ready.predict({"prompt": "x", **inputs})
    assert status == 422, body
    assert body["detail"][0]["loc"][-1] == field


def test_failed_prediction_explains_and_the_next_one_works(ready):
    status, body = ready.predict({"prompt": "x", "duration": 2, "model_version": "large"})
    assert status == 200 and body["status"] == "failed"
    assert "model_version" in body["error"] and "script/download-weights large" in body["error"]
    ready.wait_ready(30)
    status, body = ready.predict({"prompt": "x", "duration": 1, "model_version": "small"})
    assert body["status"] == "succeeded"


def test_corrupt_input_audio_is_a_failed_prediction_naming_input_audio(ready):
    junk = "data:audio/wav;base64," + "UklGRiQAAABXQVZFZm10IBAAAAABAAEA"  # a WAV header cut short
    status, body = ready.predict({"prompt": "x", "duration": 2, "continuation": True, "model_version": "small",
                                  "input_audio": junk})
    assert status == 200 and body["status"] == "failed"
    assert "input_audio" in body["error"]


def test_async_prediction_reports_to_the_webhook(ready, webhook):
    status, body = ready.request("POST", "/predictions",
                                 {"input": {"prompt": "rock", "duration": 2, "model_version": "small", "seed": 1},
                                  "webhook": webhook.url, "id": "async-1"},
                                 headers={"Prefer": "respond-async"})
    assert status == 202, body
    assert webhook.done.wait(120), webhook.events
    final = webhook.events[-1]
    assert final["id"] == "async-1" and final["status"] == "succeeded"
    audio, sr = decode_output(final)
    assert audio.shape == (1, 64000)


def test_cancel_stops_a_long_prediction_and_the_server_stays_ready(ready, webhook):
    status, _ = ready.request("POST", "/predictions", {"input": {"prompt": "x", "duration": 120,
                                                                 "model_version": "stereo-small"},
                                                       "webhook": webhook.url, "id": "to-cancel"},
                              headers={"Prefer": "respond-async"})
    assert status == 202
    deadline = time.monotonic() + 30
    while ready.health().get("status") != "BUSY" and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # let it get into the decode loop
    t = time.monotonic()
    status, _ = ready.request("POST", "/predictions/to-cancel/cancel")
    assert status == 200
    assert webhook.done.wait(60), webhook.events
    assert webhook.events[-1]["status"] == "canceled"
    assert time.monotonic() - t < 20  # a 120 s clip takes far longer than this to finish
    ready.wait_ready(30)
    status, body = ready.predict({"prompt": "x", "duration": 1, "model_version": "small"})
    assert body["status"] == "succeeded"
