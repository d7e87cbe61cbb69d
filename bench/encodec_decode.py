"""EnCodec decoding of a 30 s MusicGen clip (32 kHz mono, fp16, random-init full-size codec): where its time goes and
whether cuDNN's autotuner (per shape) helps. GPU only, diagnostic.   python3 bench/encodec_decode.py"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from musicgen import build, timed  # noqa: E402


def best_of(fn, reps=5):
    """Best wall s of `reps` calls, after one untimed call."""
    fn()
    return round(min(timed(fn)[1] for _ in range(reps)), 4)


model = build("small")
codec = model.audio_encoder
codes = torch.randint(0, 2048, (1, 1, 4, 1500), device="cuda")
res = {}
with torch.inference_mode():
    def decode():
        return codec.decode(codes, [None]).audio_values

    res["decode_s"] = best_of(decode)
    with torch.backends.cudnn.flags(enabled=True, benchmark=True):
        res["decode_cudnn_benchmark_s"] = best_of(decode)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decode()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
print("ENCODEC " + json.dumps(res))
