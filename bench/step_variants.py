"""Decode-step variants of our fused path on one GPU (30 s clip unless given, batch 1, CFG 3, top_k 250, fp16):
the GEMV configs (lib's table against session 4's table and the 1024-wide-K heuristic used before), the GEMV's one-pass form
(lib.musicgen_fast.GEMV_ONE_PASS) against the loop it replaces where one K step covers K, the GEMVs launched as
programmatic dependents (GEMV_PDL) or not, the attention kernels too (ATTN_PDL) or not, cross-attention folded into
two GEMVs (CROSS_FOLD) or not, L2-prefetch size, and the
cuBLAS step for reference. Fused variants with the same GEMV configs must give the same tokens as the first (same
seed); other configs sum in another order (`agreement`: the share of equal tokens). (Programmatic dependent launch
was tried the same way and measured slower: results/musicgen-h100-step-variants-pdl.txt, patch in
results/musicgen-h100-pdl-experiment.diff.)
    python3 bench/step_variants.py small,medium,large [variant,...] [seconds]"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from musicgen import build, clip_wall  # noqa: E402
from lib.musicgen_codes import decoding_steps  # noqa: E402
import lib.musicgen_fast as musicgen_fast  # noqa: E402
from lib.musicgen_fast import FastMusicgen  # noqa: E402


GEMV_CONFIG, GEMV_PDL, ATTN_PDL = musicgen_fast._gemv_config, musicgen_fast.GEMV_PDL, musicgen_fast.ATTN_PDL
GEMV_CONFIGS = dict(musicgen_fast.GEMV_CONFIGS)
# the table as chosen in session 4 (standalone chains, no dependent launches), for the 'fused-gemv-session4' variant
GEMV_CONFIGS_SESSION4 = {
    (3072, 1024): (2, 1024, 4), (1024, 1024): (4, 1024, 4), (4096, 1024): (4, 1024, 4), (1024, 4096): (4, 4096, 4),
    (8192, 1024): (4, 1024, 4),
    (4608, 1536): (4, 2048, 4), (1536, 1536): (4, 2048, 4), (6144, 1536): (4, 2048, 4), (1536, 6144): (2, 2048, 4),
    (8192, 1536): (4, 2048, 4),
    (6144, 2048): (2, 2048, 4), (2048, 2048): (2, 2048, 4), (8192, 2048): (4, 2048, 4), (2048, 8192): (2, 4096, 8),
}

sizes = sys.argv[1].split(",") if len(sys.argv) > 1 else ["small", "medium", "large"]
variants = [("fused-pf0", dict(prefetch_bytes=0)), ("fused-gemv-before", dict(prefetch_bytes=0, gemv_before=True)),
            ("fused-two-pass", dict(prefetch_bytes=0, one_pass=False)),
            ("fused-pdl", dict(prefetch_bytes=0, pdl=True)), ("fused-no-pdl", dict(prefetch_bytes=0, pdl=False)),
            ("fused-gemv-pdl-only", dict(prefetch_bytes=0, pdl=True, attn_pdl=False)),
            ("fused-no-fold", dict(prefetch_bytes=0, cross_fold=False)),
            ("fused-gemv-session4", dict(prefetch_bytes=0, gemv_table=GEMV_CONFIGS_SESSION4)),
            ("cublas-step", dict(fused_step=False)),
            ("fused-pf8M", dict(prefetch_bytes=8 << 20)), ("fused-pf24M", dict(prefetch_bytes=24 << 20))]
if len(sys.argv) > 2:
    variants = [v for v in variants if v[0] in sys.argv[2].split(",")]
secs = int(sys.argv[3]) if len(sys.argv) > 3 else 30
res = {}
for size in sizes:
    model = build(size)
    steps = decoding_steps(4, secs * 50)
    ref = None
    for name, kw in variants:
        kw = dict(kw)  # gemv_before / one_pass: module settings swapped while this variant is built and run
        # gemv_before: the K-step heuristic every shape used until session 4
        musicgen_fast._gemv_config = musicgen_fast._gemv_config_k_steps if kw.pop("gemv_before", False) else GEMV_CONFIG
        musicgen_fast.GEMV_ONE_PASS = kw.pop("one_pass", True)
        musicgen_fast.GEMV_PDL = kw.pop("pdl", GEMV_PDL)
        musicgen_fast.ATTN_PDL = kw.pop("attn_pdl", ATTN_PDL)
        musicgen_fast.CROSS_FOLD = kw.pop("cross_fold", True)
        musicgen_fast.GEMV_CONFIGS.clear()
        musicgen_fast.GEMV_CONFIGS.update(kw.pop("gemv_table", GEMV_CONFIGS))
        fast = FastMusicgen(model, "cuda", torch.float16, **kw)
        codes, dt = clip_wall(fast, secs)
        agreement = None
        if name.startswith("fused"):
            ref = codes if ref is None else ref
            agreement = round(float((ref == codes).float().mean()), 4)
        res[f"{size}.{name}"] = dict(wall_s=round(dt, 3), ms_per_step=round(dt / steps * 1000, 3),
                                     agreement=agreement)
        print(size, name, res[f"{size}.{name}"], flush=True)
        del fast
        torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
musicgen_fast._gemv_config, musicgen_fast.GEMV_ONE_PASS = GEMV_CONFIG, True
musicgen_fast.GEMV_PDL, musicgen_fast.ATTN_PDL, musicgen_fast.CROSS_FOLD = GEMV_PDL, ATTN_PDL, True
musicgen_fast.GEMV_CONFIGS.clear()
musicgen_fast.GEMV_CONFIGS.update(GEMV_CONFIGS)
print("VARIANTS " + json.dumps(res))
