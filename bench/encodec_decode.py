"""EnCodec decoding of a 30 s MusicGen clip (32 kHz mono, fp16, random-init full-size codec): where its time goes,
whether cuDNN's autotuner (per shape) helps, and the decode with its LSTM as one launch per layer (lib/lstm.py) against
cuDNN's: time, and the difference in the LSTM's output and the audio. GPU only.   python3 bench/encodec_decode.py"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from musicgen import build, timed  # noqa: E402
from lib.lstm import fused_lstm, lstm_layers  # noqa: E402


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
    ref = decode()
    with fused_lstm(codec.decoder) as n:
        res["fused_lstm_modules"] = n
        res["decode_fused_lstm_s"] = best_of(decode)
        ours = decode()
    res["fused_lstm_audio_rel_err"] = float((ours.float() - ref.float()).norm() / ref.float().norm())
    for frames in (400, 1500):  # 8 s and 30 s
        short = codes[..., :frames]
        res[f"decode_{frames}_frames_s"] = best_of(lambda: codec.decode(short, [None]).audio_values)
        with fused_lstm(codec.decoder):
            res[f"decode_{frames}_frames_fused_lstm_s"] = best_of(lambda: codec.decode(short, [None]).audio_values)
    # the LSTM alone on random input, against cuDNN in fp16 and against fp32
    lstm = next(m.lstm for m in codec.decoder.modules() if hasattr(m, "lstm"))
    x = torch.randn(1500, 1, lstm.input_size, device="cuda", dtype=torch.float16)
    exact = lstm.float()(x.float())[0]
    lstm.half()
    for tag, out in (("cudnn_fp16", lstm(x)[0]), ("ours_fp16", lstm_layers(lstm, x))):
        res[f"lstm_{tag}_rel_err_vs_fp32"] = float((out.float() - exact).norm() / exact.norm())
    res["lstm_cudnn_s"] = best_of(lambda: lstm(x))
    res["lstm_ours_s"] = best_of(lambda: lstm_layers(lstm, x))
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decode()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
print("ENCODEC " + json.dumps(res))
