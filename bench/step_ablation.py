"""What each part of the fused decode step costs inside the step (GPU only, diagnostic): the same clip (batch 1, CFG 3,
fp16) timed with one part changed or removed. Removing a part gives wrong tokens; only the time is read: the
difference to `full` is that part's marginal cost in the chain of dependent kernels, which a per-kernel profile
(overlapping programmatic dependents) cannot show.
    python3 bench/step_ablation.py small,large [variant,...] [seconds]
Variants:
- full: lib as it is;
- no-self-attn: the self-attention kernel not launched;
- splitsN-btT[-wW]: self-attention in N programs per (row, head) (a power of two), T keys per block, W warps (4)
  (lib: musicgen_fast.SELF_ATTN_SPLIT);
- no-attn-pdl: the attention kernels launched normally (keys / values not asked for before the previous kernel ends);
- no-topk: top_k 0 (the sampling kernel's sort skipped);
- gemv-N-K-BNxBKxW[+...]: the (N, K) matrices' GEMV configs in musicgen_fast.GEMV_CONFIGS replaced;
- norm-fold-off / norm-fold-on: the cross-attention's scores GEMV after the layer norm, its own dependent kernel
  (before session 7), or beside the out projection at every width (musicgen_fast.CROSS_LN_FOLD, _MAX_D);
- early-off: every GEMV lets the next kernel launch only once past its own wait (before session 9), instead of at
  its start where the next kernel is a GEMV (musicgen_fast.GEMV_EARLY);
- attn-early-off: only GEMVs followed by a GEMV let it launch at their start (musicgen_fast.ATTN_EARLY off);
- attn-early-PART[+PART]: those parts of ATTN_EARLY (qkv, attn, heads) at every width (ATTN_EARLY_MIN_D 0);
- sample-pdl-off: the sampling kernel and the counters launched normally (musicgen_fast.SAMPLE_PDL);
- sample-wW: the sampling kernel in W warps (musicgen_fast.SAMPLE_WARPS);
- text-eager: the text encoder run eagerly (before session 8) instead of replayed as a CUDA graph
  (musicgen_fast.TEXT_GRAPHS); the clip's wall time includes it;
- cond32: text lengths bucketed by multiples of 32 tokens (before session 5) instead of powers of two: the benchmark's
  12-token prompt then pads to 32;
- persistent: the persistent kernel (lib/musicgen_persistent.py, off in lib), as are the p* variants below;
- persistent kernel settings: pgridN-wW-rR-cC (N programs per SM of W warps, at most R registers, C values of W
  per chunk; each part optional), psplitN-btT (self-attention items per
  (row, head), keys per block), pnocoop (a plain launch instead of a cooperative one), pnosync (no barriers:
  wrong tokens, the phases' own time)."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from musicgen import build, clip_wall  # noqa: E402
from lib.musicgen_codes import decoding_steps  # noqa: E402
import lib.musicgen_fast as mf  # noqa: E402
import lib.musicgen_persistent as mp  # noqa: E402

SPLIT, SELF_ATTEND, ATTN_PDL = mf.SELF_ATTN_SPLIT, mf._self_attend_fused, mf.ATTN_PDL
PERSISTENT = dict(CHUNK_ELEMS=mp.CHUNK_ELEMS, NUM_WARPS=mp.NUM_WARPS, SPLIT=mp.SPLIT, COOPERATIVE=mp.COOPERATIVE,
                  BARRIERS=mp.BARRIERS, PROGRAMS_PER_SM=mp.PROGRAMS_PER_SM, MAXNREG=mp.MAXNREG)
GEMV_CONFIGS, COND_BUCKET = dict(mf.GEMV_CONFIGS), mf._cond_bucket
LN_FOLD, LN_FOLD_MAX_D = mf.CROSS_LN_FOLD, mf.CROSS_LN_FOLD_MAX_D
SAMPLE_PDL, SAMPLE_WARPS = mf.SAMPLE_PDL, mf.SAMPLE_WARPS
GEMV_EARLY, ATTN_EARLY, ATTN_EARLY_MIN_D = mf.GEMV_EARLY, mf.ATTN_EARLY, mf.ATTN_EARLY_MIN_D
sizes = sys.argv[1].split(",") if len(sys.argv) > 1 else ["small", "large"]
names = sys.argv[2].split(",") if len(sys.argv) > 2 and sys.argv[2] else [
    "full", "no-self-attn", "splits16-bt32", "splits16-bt64", "splits4-bt64", "no-topk"]
secs = int(sys.argv[3]) if len(sys.argv) > 3 else 30


def compiled_stats() -> dict:
    """Registers and spills of the persistent step kernel's compiled variants (Triton's internals; {} if they moved)."""
    out = {}
    try:
        for cache in mp._step_kernel.device_caches.values():
            for kernel in cache[0].values():
                kernel._init_handles()
                out.setdefault("regs", []).append(kernel.n_regs)
                out.setdefault("spills", []).append(kernel.n_spills)
    except Exception:
        pass
    return out


def configure(name):
    mf.SELF_ATTN_SPLIT, mf._self_attend_fused, mf.ATTN_PDL = SPLIT, SELF_ATTEND, ATTN_PDL
    mf.GEMV_CONFIGS.clear()
    mf.GEMV_CONFIGS.update(GEMV_CONFIGS)
    mf._cond_bucket = COND_BUCKET
    mf.CROSS_LN_FOLD = LN_FOLD and name != "norm-fold-off"
    mf.CROSS_LN_FOLD_MAX_D = 1 << 30 if name == "norm-fold-on" else LN_FOLD_MAX_D
    mf.TEXT_GRAPHS = name != "text-eager"
    mf.SAMPLE_PDL, mf.SAMPLE_WARPS = SAMPLE_PDL, SAMPLE_WARPS
    mf.GEMV_EARLY = GEMV_EARLY and name != "early-off"
    mf.ATTN_EARLY = () if name in ("early-off", "attn-early-off") else ATTN_EARLY
    mf.ATTN_EARLY_MIN_D = ATTN_EARLY_MIN_D
    if name.startswith("attn-early-") and name != "attn-early-off":  # attn-early-PART[+PART]: those at every width
        mf.ATTN_EARLY, mf.ATTN_EARLY_MIN_D = tuple(name[len("attn-early-"):].split("+")), 0
    mf.PERSISTENT_STEP = name == "persistent" or name.startswith(("pgrid", "psplit", "pnocoop", "pnosync"))
    for key, value in PERSISTENT.items():
        setattr(mp, key, value)
    if name.startswith("pgrid"):  # pgridN-wW-rR-cC (above)
        for part in name[len("pgrid"):].split("-"):
            key, val = (part[0], part[1:]) if part[0] in "wrc" else ("n", part)
            attr = dict(n="PROGRAMS_PER_SM", w="NUM_WARPS", r="MAXNREG", c="CHUNK_ELEMS")[key]
            setattr(mp, attr, int(val))
    elif name.startswith("psplit"):
        mp.SPLIT = tuple(int(v) for v in name[len("psplit"):].split("-bt"))
    elif name == "pnocoop":
        mp.COOPERATIVE = False
    elif name == "pnosync":
        mp.BARRIERS = False
    elif name.startswith("gemv-"):  # gemv-N-K-BNxBKxW[+gemv-...]: matrix shapes' GEMV configs
        for part in name.split("+"):
            _, n, k, cfg = part.split("-")
            mf.GEMV_CONFIGS[(int(n), int(k))] = tuple(int(v) for v in cfg.split("x"))
    elif name == "sample-pdl-off":
        mf.SAMPLE_PDL = False
    elif name.startswith("sample-w"):
        mf.SAMPLE_WARPS = int(name[len("sample-w"):])
    elif name == "cond32":
        mf._cond_bucket = lambda n, block: mf._round_up(n, block)
    elif name == "no-attn-pdl":
        mf.ATTN_PDL = False
    elif name == "no-self-attn":
        mf._self_attend_fused = lambda q, kc, vc, out, *a, **k: out
    elif name.startswith("splits"):
        n, t, w = (name[len("splits"):].replace("-bt", " ").replace("-w", " ") + " 4").split()[:3]
        mf.SELF_ATTN_SPLIT = (int(n), int(t), int(w))
    return 0 if name == "no-topk" else 250


res = {}
for size in sizes:
    model = build(size)
    steps = decoding_steps(4, secs * 50)
    first = None  # the first variant's codes: variants that change no arithmetic must give the same tokens
    for name in names:
        top_k = configure(name)
        fast = mf.FastMusicgen(model, "cuda", torch.float16)
        try:
            codes, dt = clip_wall(fast, secs, top_k=top_k)
        except Exception as e:  # one variant failing (e.g. a launch this driver refuses) must not end the run
            res[f"{size}.{name}"] = dict(error=f"{type(e).__name__}: {e}"[:300])
            print(size, name, res[f"{size}.{name}"], flush=True)
            continue
        first = codes if first is None else first
        res[f"{size}.{name}"] = dict(wall_s=round(dt, 3), ms_per_step=round(dt / steps * 1000, 3),
                                     persistent=fast.persistent is not None,
                                     tokens_equal_first=bool(torch.equal(codes, first)), **compiled_stats())
        print(size, name, res[f"{size}.{name}"], flush=True)
        del fast
        torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
configure("full")
print("ABLATION " + json.dumps(res))
