"""Diagnostic (GPU): which Triton kernel variants the first MusicGen request after setup compiles, and its time.
    python3 bench/first_request_probe.py [off]   (off: GEMV_EARLY, ATTN_EARLY, SAMPLE_PDL off, session 8's launches)"""
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402
import triton  # noqa: E402

import lib.musicgen_fast as mf  # noqa: E402
from lib import tiny  # noqa: E402
from lib.request import Request  # noqa: E402
from lib.service import Service  # noqa: E402

if sys.argv[1:] == ["off"]:
    mf.GEMV_EARLY, mf.ATTN_EARLY, mf.SAMPLE_PDL = False, (), False
weights = Path(tempfile.mkdtemp()) / "weights"
tiny.write_all(weights)
t = time.perf_counter()
service = Service(weights_dir=weights, device="cuda")
print("setup", round(time.perf_counter() - t, 2), flush=True)
seen = []
triton.knobs.runtime.jit_cache_hook = lambda **kw: seen.append(kw["repr"][:160])  # None: compile as usual
for i, secs in enumerate((3, 3, 2.5, 3)):
    torch.cuda.synchronize()
    t = time.perf_counter()
    service.predict(Request.from_inputs(prompt="lofi beat", duration=secs, model_version="small", seed=1))
    torch.cuda.synchronize()
    print(sys.argv[1:], "request", i, secs, "s:", round(time.perf_counter() - t, 3), "compiled:", len(seen), seen[:6],
          flush=True)
    seen.clear()
