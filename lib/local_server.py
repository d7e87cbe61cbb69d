"""Run the real Cog HTTP server (coglet) locally, without Docker: for `script/predict` and the tests.

coglet starts its worker as a bare `python` from PATH, so the interpreter running us goes first on PATH;
it validates inputs only against `.cog/openapi_schema.json`, which we write from the predictor first."""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from lib.openapi import REPO_ROOT, write_schema

_PORT_RE = re.compile(r"Starting coglet server on [\d.]+:(\d+)")


class ServerError(RuntimeError):
    pass


class LocalServer:
    """`with LocalServer(weights=...) as server: server.predict({...})`"""

    def __init__(self, weights: Optional[Path] = None, env: Optional[dict] = None, root: Path = REPO_ROOT,
                 setup_timeout: float = 300.0, log_file: Optional[Path] = None):
        self.root, self.setup_timeout = Path(root), setup_timeout
        self.env = dict(os.environ)
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["PYTHONUNBUFFERED"] = "1"
        if weights is not None:
            self.env["COG_MUSIC_WEIGHTS"] = str(Path(weights).resolve())
        self.env.update(env or {})
        self.proc: Optional[subprocess.Popen] = None
        self.port: Optional[int] = None
        self.output_lines: list[str] = []
        self.log_file = log_file

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self, wait_ready: bool = True) -> "LocalServer":
        write_schema(self.root)
        code = ("import coglet; coglet.server.serve(predictor_ref='predict.py:Predictor', host='127.0.0.1', "
                "port=0, output_temp_dir_base=%r)" % str(Path("/tmp/coglet-output") / str(os.getpid())))
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=self.root, env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     start_new_session=True)
        port_found = threading.Event()

        def pump():
            for line in self.proc.stdout:
                self.output_lines.append(line)
                if self.log_file:
                    with open(self.log_file, "a") as f:
                        f.write(line)
                m = _PORT_RE.search(line)
                if m and self.port is None:
                    self.port = int(m.group(1))
                    port_found.set()
            port_found.set()

        threading.Thread(target=pump, daemon=True).start()
        if not port_found.wait(60) or self.port is None:
            self.stop()
            raise ServerError("the server did not start:\n" + "".join(self.output_lines[-30:]))
        if wait_ready:
            self.wait_ready(self.setup_timeout)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.request("POST", "/shutdown", timeout=5)
            except Exception:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- HTTP -----------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body=None, headers: Optional[dict] = None, timeout: float = 600):
        """(status, parsed JSON body or raw text). Never raises on HTTP error statuses."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode("utf-8", "replace")

    def health(self) -> dict:
        return self.request("GET", "/health-check", timeout=10)[1]

    def wait_ready(self, timeout: float = 60.0) -> dict:
        """Wait for READY (a slot frees a moment after each reply). Raises with the logs on SETUP_FAILED."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError("the server exited:\n" + "".join(self.output_lines[-40:]))
            try:
                h = self.health()
            except (urllib.error.URLError, ConnectionError, OSError):
                h = {}
            status = h.get("status") if isinstance(h, dict) else None
            if status == "READY":
                return h
            if status == "SETUP_FAILED":
                raise ServerError("setup failed:\n" + str(h.get("setup", {}).get("logs", h)))
            if time.monotonic() > deadline:
                raise ServerError(f"server not READY after {timeout:.0f}s (last health: {h})")
            time.sleep(0.1)

    def predict(self, inputs: dict, headers: Optional[dict] = None, timeout: float = 600):
        """POST /predictions. Returns (status code, response body)."""
        return self.request("POST", "/predictions", {"input": inputs}, headers=headers, timeout=timeout)


def file_to_data_uri(path: Path, mime: str = "application/octet-stream") -> str:
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def data_uri_to_bytes(uri: str) -> bytes:
    if not uri.startswith("data:"):
        raise ValueError(f"expected a data: URI, got {uri[:60]!r}")
    return base64.b64decode(uri.split(",", 1)[1])
