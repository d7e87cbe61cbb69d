"""EnCodec decoding of a 30 s MusicGen clip (32 kHz mono, fp16, random-init full-size codec): where its time goes and
whether cuDNN's autotuner (per shape) helps. GPU only, diagnostic.   python3 bench/encodec_decode.py"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from musicgen import build  # noqa: E402


def timed(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return round(min(ts), 4)


model = build("small")
codec = model.audio_encoder
codes = torch.randint(0, 2048, (1, 1, 4, 1500), device="cuda")
res = {}
with torch.inference_mode():
    def decode():
        return codec.decode(codes, [None]).audio_values

    res["decode_s"] = timed(decode)
    with torch.backends.cudnn.flags(enabled=True, benchmark=True):
        res["decode_cudnn_benchmark_s"] = timed(decode)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decode()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
print("ENCODEC " + json.dumps(res))
