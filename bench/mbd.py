"""Multi-Band Diffusion: parity of lib.mbd with audiocraft 1.3.0, and speed, on the GPU machine, one run.

Run (GPU machine; audiocraft's pure-Python wheels in .whl/, see shared/peers/build-wheels.sh):
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  PYTHONPATH=/tmp/site:. python3 bench/mbd.py [--configs transformer,conv] [--secs 30]

1. Random weights in the checkpoint's layout: each band's U-Net built by audiocraft's own builder from an
   omegaconf config, random processor statistics for bands 2-3, saved with torch.save as the published
   mbd_musicgen_32khz.th is ({"sample_rate", "n_bands", i: {"cfg", "model_state", "processor_state"}}).
2. Reference: audiocraft's loader + MultiBandDiffusion.tokens_to_wav on a random EnCodec (audiocraft's),
   every torch.randn_like it draws recorded. Ours: lib.mbd loads the same file (weights_only=True) and
   decodes the same codes with the same codec and the recorded noise. fp32, TF32 off: max abs diff.
   To judge that difference, audiocraft is run again with every noise value moved by ~1 ulp: what fp32
   rounding alone does after 20 steps.
3. Timing, 30 s of audio (1500 frames): audiocraft's tokens_to_wav (fp32, as it ships) vs ours (bf16,
   U-Net calls replayed as CUDA graphs), after a warm-up; ours also for a stereo pair.
The U-Net size of the published file is not known here (no hub): we use audiocraft's default diffusion
U-Net (config/model/score/basic.yaml: hidden 48, depth 4, growth 4, kernel 8, stride 4) with codec_dim 128
and either a 6-layer transformer bottleneck ("transformer", 1.87 B parameters over 4 bands) or none
("conv", as basic.yaml has it: 0.66 B); results name the config.
"""
import argparse
import importlib.machinery
import json
import os
import sys
import time
import types

import torch

sys.path.insert(0, os.getcwd())
from transformers import T5Tokenizer  # noqa: F401  resolve before the stubs exist

for name in ("spacy", "av", "librosa", "librosa.filters", "soundfile"):
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    sys.modules[name] = m
xf, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
xf.__spec__ = importlib.machinery.ModuleSpec("xformers", None)
ops.__spec__ = importlib.machinery.ModuleSpec("xformers.ops", None)
ops.unbind = torch.unbind
ops.LowerTriangularMask = type("LowerTriangularMask", (), {})
ops.memory_efficient_attention = None
xf.ops = ops
sys.modules["xformers"], sys.modules["xformers.ops"] = xf, ops

import omegaconf  # noqa: E402
from audiocraft.models import builders, loaders  # noqa: E402
from audiocraft.models.multibanddiffusion import DiffusionProcess, MultiBandDiffusion  # noqa: E402
from audiocraft.modules.diffusion_schedule import NoiseSchedule  # noqa: E402

from lib import mbd as ours  # noqa: E402
from lib.tiny_mbd import band_config  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--configs", default="transformer,conv")
ap.add_argument("--secs", type=int, default=30)
args = ap.parse_args()
OUT = os.environ.get("OUT", "/tmp/out")
os.makedirs(OUT, exist_ok=True)
dev = "cuda"
results = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0)}


def log(**kw):
    print(json.dumps(kw), flush=True)


def comp_cfg():
    return omegaconf.OmegaConf.create({
        "device": dev, "compression_model": "encodec",
        "encodec": {"autoencoder": "seanet", "quantizer": "rvq", "sample_rate": 32000, "channels": 1,
                    "causal": False, "renormalize": False},
        "seanet": {"dimension": 128, "channels": 1, "causal": False, "n_filters": 64, "n_residual_layers": 1,
                   "ratios": [8, 5, 4, 4], "activation": "ELU", "activation_params": {"alpha": 1.0},
                   "norm": "weight_norm", "norm_params": {}, "kernel_size": 7, "last_kernel_size": 7,
                   "residual_kernel_size": 3, "dilation_base": 2, "pad_mode": "constant", "true_skip": True,
                   "compress": 2, "lstm": 2, "disable_norm_outer_blocks": 0, "encoder": {},
                   "decoder": {"trim_right_ratio": 1.0}},
        "rvq": {"n_q": 4, "q_dropout": False, "bins": 2048, "decay": 0.99, "kmeans_init": False,
                "kmeans_iters": 10, "threshold_ema_dead_code": 2, "orthogonal_reg_weight": 0.0,
                "orthogonal_reg_active_codes_only": False}})


def make_checkpoint(path, **unet):
    torch.manual_seed(0)
    pkg = {"sample_rate": 32000, "n_bands": 4}
    for b in range(4):
        cfg = omegaconf.OmegaConf.create(band_config(b, codec_dim=128, **unet))
        model = builders.get_diffusion_model(cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.add_(0.1 * torch.randn_like(p))
        proc = builders.get_processor(cfg.processor, sample_rate=32000)
        pstate = proc.state_dict()
        if cfg.processor.use:
            nb = cfg.processor.n_bands
            pstate.update({"counts": torch.tensor([10000.0]), "sum_x": 10 * torch.randn(nb),
                           "sum_x2": (0.01 + 0.05 * torch.rand(nb)) * 10000,
                           "sum_target_x2": (0.1 + torch.rand(nb)) * 10000})
        pkg[b] = {"cfg": cfg, "model_state": model.state_dict(), "processor_state": pstate}
    torch.save(pkg, path)


def reference_mbd(path, codec):
    orig = torch.load
    loaders.torch.load = lambda *a, **k: orig(*a, **{**k, "weights_only": False})  # its omegaconf configs
    try:
        models, processors, cfgs = loaders.load_diffusion_models(path, device=dev)
    finally:
        loaders.torch.load = orig
    dps = [DiffusionProcess(model=m.eval(), noise_schedule=NoiseSchedule(**c.schedule, sample_processor=p,
                                                                         device=dev))
           for m, p, c in zip(models, processors, cfgs)]
    return MultiBandDiffusion(DPs=dps, codec_model=codec)


class AudiocraftCodec:
    def __init__(self, codec):
        self.codec = codec

    def decode(self, codes):
        return self.codec.decode(codes)

    def latent(self, codes):
        return self.codec.decode_latent(codes)


def recorded_run(ref, codes):
    drawn = []
    orig = torch.randn_like

    def rec(*a, **k):
        t = orig(*a, **k)
        drawn.append(t.clone())
        return t

    torch.randn_like = rec
    try:
        with torch.no_grad():
            wav = ref.tokens_to_wav(codes)
    finally:
        torch.randn_like = orig
    return wav, drawn


def replayed_run(ref, codes, drawn, dtype):
    """audiocraft again, its randn_like calls answered with the recorded noise (cast to `dtype`)."""
    it = iter(drawn)
    orig = torch.randn_like
    torch.randn_like = lambda x, *a, **k: next(it).to(x.dtype)
    try:
        with torch.no_grad():
            return ref.tokens_to_wav(codes.to(codes.device))
    finally:
        torch.randn_like = orig


def timed(fn, reps=2):
    fn()
    torch.cuda.synchronize()
    best = 1e9
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


codec = builders.get_compression_model(comp_cfg()).to(dev).eval()
configs = {"transformer": dict(hidden=48, depth=4, growth=4, transformer=True),
           "conv": dict(hidden=48, depth=4, growth=4, transformer=False),
           "blstm": dict(hidden=48, depth=4, growth=4, transformer=False, bilstm=True)}
configs = {k: configs[k] for k in args.configs.split(",")}
results["argv"] = sys.argv
for label, unet in configs.items():
    path = f"/tmp/mbd_{label}.th"
    make_checkpoint(path, **unet)
    ref = reference_mbd(path, codec)
    t0 = time.perf_counter()
    mine32 = ours.MultiBandDiffusion.from_checkpoint(path, device=dev, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for b in mine32.bands for p in b.unet.parameters())
    entry = {"unet": band_config(0, codec_dim=128, **unet)["diffusion_unet"], "params": n_params, "load_s": round(load_s, 2)}

    # parity: stereo pair (2 batch items), 2 s, fp32, TF32 off
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator(device=dev).manual_seed(1)
    codes = torch.randint(0, 2048, (2, 4, 100), device=dev, generator=g)
    torch.manual_seed(123)
    ref_wav, drawn = recorded_run(ref, codes)
    steps = len(mine32.bands[0].coefs)
    assert len(drawn) == 4 * steps, (len(drawn), steps)
    with torch.no_grad():
        our_wav = mine32.decode(codes, AudiocraftCodec(codec), noise=lambda b, i, s: drawn[b * steps + i])
    diff = (our_wav - ref_wav).abs().max().item()
    entry["parity_fp32"] = {"shape": list(ref_wav.shape), "max_abs_diff": diff,
                            "ref_max_abs": ref_wav.abs().max().item(), "ref_std": ref_wav.std().item()}
    # yardstick: audiocraft against itself with every noise value moved by ~1 ulp (fp32 rounding noise)
    gp = torch.Generator(device=dev).manual_seed(5)
    nudged = [d * (1 + 2.0 ** -23 * torch.randn(d.shape, device=d.device, generator=gp)) for d in drawn]
    ref_nudged = replayed_run(ref, codes, nudged, torch.float32)
    entry["parity_fp32"]["audiocraft_vs_itself_1ulp_noise_max_abs"] = (ref_nudged - ref_wav).abs().max().item()
    del nudged, ref_nudged
    del mine32
    mine16 = ours.MultiBandDiffusion.from_checkpoint(path, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        our16 = mine16.decode(codes, AudiocraftCodec(codec), noise=lambda b, i, s: drawn[b * steps + i])
    entry["parity_bf16_vs_fp32_ref"] = {"max_abs_diff": (our16 - ref_wav).abs().max().item(),
                                        "rel_rms": ((our16 - ref_wav).pow(2).mean().sqrt()
                                                    / ref_wav.pow(2).mean().sqrt()).item()}
    log(config=label, **entry)
    del drawn

    results[label] = entry
    if label == "blstm":  # a 3072-wide BLSTM over 3750 frames x 80 calls: too long for this run
        del mine16, ref
        continue
    # speed: mono and a stereo pair, defaults (TF32 as each ships: torch defaults)
    torch.backends.cudnn.allow_tf32 = True
    frames = args.secs * 50
    codes30 = torch.randint(0, 2048, (1, 4, frames), device=dev, generator=g)
    codes30s = torch.randint(0, 2048, (2, 4, frames), device=dev, generator=g)
    gen = torch.Generator(device=dev).manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    entry[f"ours_bf16_{args.secs}s_s"] = round(timed(lambda: mine16.decode(codes30, AudiocraftCodec(codec), generator=gen)), 3)
    entry["peak_gb_ours"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    entry[f"ours_bf16_{args.secs}s_stereo_s"] = round(timed(lambda: mine16.decode(codes30s, AudiocraftCodec(codec), generator=gen)), 3)
    log(config=label, **{k: v for k, v in entry.items() if k.startswith("ours_bf16")})
    del mine16
    torch.cuda.empty_cache()
    with torch.no_grad():
        entry[f"audiocraft_{args.secs}s_s"] = round(timed(lambda: ref.tokens_to_wav(codes30), reps=1), 3)
    entry["speedup"] = round(entry[f"audiocraft_{args.secs}s_s"] / entry[f"ours_bf16_{args.secs}s_s"], 2)
    log(config=label, audiocraft_s=entry[f"audiocraft_{args.secs}s_s"], speedup=entry["speedup"])
    results[label] = entry
    del ref
    torch.cuda.empty_cache()
    json.dump(results, open(os.path.join(OUT, "mbd.json"), "w"), indent=1)

json.dump(results, open(os.path.join(OUT, "mbd.json"), "w"), indent=1)
print(json.dumps(results, indent=1))
