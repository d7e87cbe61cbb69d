"""Where does one decode step's time go? (diagnostic, GPU only)  python3 bench/profile_step.py small large"""
import sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from musicgen import build, request  # noqa: E402
from lib.musicgen_fast import FastMusicgen  # noqa: E402

_im = torch.inference_mode(); _im.__enter__()
for size in sys.argv[1:]:
    model = build(size)
    fast = FastMusicgen(model, "cuda", torch.float16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    req = request(1, 8)
    fast.generate_codes(req, gen)
    s = next(iter(fast._slots.values()))
    key, g = next(iter(s.graphs.items()))
    kv_len, cfg, mode = key
    s.kv_pos.fill_(100); s.col.fill_(101); s.noise_i.fill_(0)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(50):
        g.replay()
    host = (time.perf_counter() - t) / 50
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True)
    s.kv_pos.fill_(100); s.col.fill_(101); s.noise_i.fill_(0)
    e0.record()
    for _ in range(50):
        g.replay()
    e1.record(); torch.cuda.synchronize()
    print(f"{size}: graph replay GPU {e0.elapsed_time(e1)/50:.3f} ms/step, host {host*1000:.3f} ms/launch, kv_len {kv_len}")
    from torch.profiler import profile, ProfilerActivity
    s.kv_pos.fill_(100); s.col.fill_(101); s.noise_i.fill_(0)
    with torch.inference_mode():
        fast._decode_step(s, kv_len, cfg, mode); torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fast._decode_step(s, kv_len, cfg, mode)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    del fast, model; torch.cuda.empty_cache()
