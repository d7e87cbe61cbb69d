"""End-to-end check of the predictor's GPU path on tiny random weights (run on the GPU machine).

The CPU tests exercise every engine through transformers' reference path; this runs the same Service on
CUDA, where MusicGen goes through lib.musicgen_fast (CUDA graphs), and checks what a user relies on:
length, rate, channels, finite audio, same seed -> same audio, windowed extension past 30 s (prompt codes
on the fast path), MBD decoding, and every diffusion engine. Writes $OUT/gpu_smoke.json.

  python3 bench/gpu_smoke.py            (needs soundfile, pyloudnorm, diffusers, torchsde: carry wheels)
"""
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import soundfile  # noqa: E402
import torch  # noqa: E402

from lib import tiny  # noqa: E402
from lib.request import Request  # noqa: E402
from lib.service import Service  # noqa: E402

CASES = [
    ("musicgen small 3 s", dict(prompt="lofi beat", duration=3, model_version="small", seed=1), (32000, 1, 3.0)),
    ("musicgen small 3 s, same seed", dict(prompt="lofi beat", duration=3, model_version="small", seed=1),
     (32000, 1, 3.0)),
    ("musicgen small 3 s, other seed", dict(prompt="lofi beat", duration=3, model_version="small", seed=2),
     (32000, 1, 3.0)),
    ("musicgen stereo 2.5 s top_p", dict(prompt="jazz", duration=2.5, model_version="stereo-small", seed=3, top_p=0.9),
     (32000, 2, 2.5)),
    ("musicgen melody model, text only", dict(prompt="rock", duration=2, model_version="melody", seed=4),
     (32000, 1, 2.0)),
    ("musicgen stereo-melody, text only, flac", dict(prompt="rock", duration=2, model_version="stereo-melody", seed=4,
                                                     output_format="flac"), (32000, 2, 2.0)),
    ("musicgen small 35 s (windowed extension)", dict(prompt="ambient", duration=35, model_version="small", seed=5),
     (32000, 1, 35.0)),
    ("musicgen greedy, cfg off, mp3", dict(prompt="techno", duration=2, model_version="small", temperature=0,
                                          classifier_free_guidance=1, output_format="mp3"), (32000, 1, 2.0)),
    ("musicgen + MBD stereo", dict(prompt="x", duration=2, model_version="stereo-small", seed=6,
                                   multi_band_diffusion=True), (32000, 2, 2.0)),
    ("ace-step turbo", dict(prompt="pop", lyrics="[verse] la la", duration=4, model_version="ace-step-1.5-turbo",
                            seed=7), (48000, 2, 4.0)),
    ("audioldm2", dict(prompt="rain", duration=3, model_version="audioldm2-music", seed=8), (16000, 1, 3.0)),
    ("audioldm", dict(prompt="rain", duration=3, model_version="audioldm", seed=8), (16000, 1, 3.0)),
    ("dance diffusion", dict(duration=2, model_version="dance-diffusion-maestro", seed=9), (None, 2, 2.0)),
    ("stable audio", dict(prompt="drums", duration=3, model_version="stable-audio-open", seed=10), (44100, 2, 3.0)),
]


def snake_check() -> dict:
    """lib.snake's fused kernel against diffusers' Snake1d on random activations (odd length, trained-like
    alpha/beta): bit-identical in bf16 (the VAEs' dtype on the GPU), and the fp32 difference."""
    from diffusers.models.autoencoders.autoencoder_oobleck import Snake1d

    from lib.snake import fused_snake

    try:
        res = {}
        for dtype in (torch.bfloat16, torch.float32):
            m = Snake1d(128).to("cuda", dtype)
            with torch.no_grad():
                m.alpha.normal_(0, 0.5), m.beta.normal_(0, 0.5)
            gen = torch.Generator("cuda").manual_seed(0)
            x = (3 * torch.randn(2, 128, 100_003, device="cuda", generator=gen)).to(dtype)
            with torch.inference_mode():
                ref = m(x)
                with fused_snake(m) as n:
                    got = m(x)
            if dtype == torch.bfloat16:
                res["bf16_identical"] = bool(torch.equal(got, ref))
            else:
                res["fp32_max_abs_diff"] = float((got - ref).abs().max())
            res["patched"] = n
        return res
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}


def ace_dit_check() -> dict:
    """lib.ace_step_dit's kernels against the stock expressions they replace, on ACE-Step XL's shapes (750 tokens,
    2560 wide, 32 / 8 heads of 128, MLP 9728; random data): per kernel and dtype the share of outputs that differ and
    the largest difference (bf16: the norms' mean square is summed in another order, the rest should be identical);
    then one random-init XL block, fused against stock, in bf16 and fp32."""
    from diffusers.models.transformers.ace_step_transformer import AceStepTransformerBlock, _create_4d_mask

    from lib import ace_step_dit as A

    def diff(got, ref):
        return dict(differ=round(float((got != ref).float().mean()), 6),
                    max_abs=float((got.float() - ref.float()).abs().max()))

    try:
        res, gen = {}, torch.Generator("cuda").manual_seed(0)
        L, D, H, KV, Dh, I = 750, 2560, 32, 8, 128, 9728
        for dtype in (torch.bfloat16, torch.float32):
            r = res[str(dtype).split(".")[-1]] = {}
            rnd = lambda *shape, s=1.0: (s * torch.randn(*shape, device="cuda", generator=gen)).to(dtype)  # noqa
            h, delta, mod, w = rnd(1, L, D, s=4.0), rnd(1, L, D), rnd(1, 6, D, s=0.3), 1 + rnd(D, s=0.1)
            shift, scale, gate = mod[:, 0:1], mod[:, 1:2], mod[:, 2:3]
            for name, a in (("norm_modulate", (None, None, w, 1e-6, scale, shift)),
                            ("gate_residual_norm", (delta, gate, w, 1e-6, None, None)),
                            ("residual_norm_modulate", (delta, None, w, 1e-6, scale, shift)),
                            ("gate_residual", (delta, gate, None, 1e-6, None, None))):
                got, ref = A.add_rms_modulate(h, *a), A.add_rms_modulate_reference(h, *a)
                r[name] = [diff(g, f) for g, f in zip(got, ref) if g is not None]
            qkv = rnd(1, L, (H + 2 * KV) * Dh, s=2.0)
            pos = torch.arange(L, device="cuda", dtype=torch.float32)[:, None] * torch.logspace(
                0, -6, Dh // 2, device="cuda")[None]
            cos, sin = (torch.cat([f(pos), f(pos)], -1).to(dtype) for f in (torch.cos, torch.sin))
            q = qkv[..., :H * Dh].unflatten(-1, (H, Dh))
            wq = 1 + rnd(Dh, s=0.1)
            r["head_norm_rope"] = diff(A.head_rms_rope(q, wq, 1e-6, cos, sin),
                                       A.head_rms_rope_reference(q, wq, 1e-6, cos, sin))
            r["head_norm"] = diff(A.head_rms_rope(q, wq, 1e-6), A.head_rms_rope_reference(q, wq, 1e-6))
            gu = rnd(1, L, 2 * I, s=3.0)
            r["silu_mul"] = diff(A.silu_mul(gu), A.silu_mul_reference(gu))

            torch.manual_seed(0)
            block = AceStepTransformerBlock(D, H, KV, Dh, I, sliding_window=128).to("cuda", dtype).eval()
            holder = torch.nn.Module()
            holder.layers = torch.nn.ModuleList([block])
            mask = _create_4d_mask(seq_len=L, dtype=dtype, device="cuda", sliding_window=128, is_sliding_window=True)
            for label, batch in (("block", 1), ("block_cfg_batch2", 2)):  # 2: the base model's CFG pair
                kw = dict(hidden_states=rnd(batch, L, D, s=4.0), position_embeddings=(cos, sin),
                          temb=rnd(batch, 6, D, s=0.3), attention_mask=mask, encoder_hidden_states=rnd(batch, 316, D))
                with torch.inference_mode():
                    ref = block(**kw)
                    with A.fused_blocks(holder):
                        got = block(**kw)
                err = got.float() - ref.float()
                r[label] = dict(max_abs=float(err.abs().max()), ref_max_abs=float(ref.abs().max()),
                                snr_db=round(float(10 * torch.log10(ref.float().pow(2).mean() /
                                                                    err.pow(2).mean().clamp_min(1e-30))), 1))
        # ok: the fused XL block within bf16 rounding of the stock one, and within fp32 summation order in fp32
        res["ok"] = all(res["bfloat16"][b]["snr_db"] >= 40 and res["float32"][b]["snr_db"] >= 100
                        for b in ("block", "block_cfg_batch2"))
        return res
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}


def main():
    out_dir = Path(os.environ.get("OUT", "."))
    weights = Path(tempfile.mkdtemp()) / "weights"
    t = time.perf_counter()
    tiny.write_all(weights)
    device = os.environ.get("SMOKE_DEVICE", "cuda")  # cpu: a dry run of this script
    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else device, "torch": torch.__version__,
              "tiny_weights_s": round(time.perf_counter() - t, 2), "cases": []}
    t = time.perf_counter()
    service = Service(weights_dir=weights, device=device)
    report["setup_s"] = round(time.perf_counter() - t, 2)
    report["fast_path"] = {n: e.fast is not None for n, e in service.engines.items() if hasattr(e, "fast")}
    audios = {}
    for name, inputs, (rate, channels, seconds) in CASES:
        case = {"case": name, "inputs": inputs}
        t = time.perf_counter()
        try:
            path = service.predict(Request.from_inputs(**inputs))
            data, sr = soundfile.read(str(path), always_2d=True, dtype="float32")
            audios[name] = data
            case.update(ok=True, seconds=round(time.perf_counter() - t, 3), rate=sr, channels=data.shape[1],
                        length_s=round(data.shape[0] / sr, 3), finite=bool(np.isfinite(data).all()),
                        peak=round(float(np.abs(data).max()), 4))
            problems = []
            if rate and sr != rate:
                problems.append(f"rate {sr} != {rate}")
            if data.shape[1] != channels:
                problems.append(f"channels {data.shape[1]} != {channels}")
            if abs(data.shape[0] / sr - seconds) > 0.06:
                problems.append(f"length {data.shape[0] / sr:.3f} != {seconds}")
            if not case["finite"] or case["peak"] == 0:
                problems.append("silent or non-finite")
            case["problems"] = problems
            case["ok"] = not problems
        except Exception as e:
            case.update(ok=False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])
        print(json.dumps({k: v for k, v in case.items() if k != "trace"}), flush=True)
        report["cases"].append(case)
    # a fine-tune (replicate_weights) on the fast path: its weights copied into the decoder's buffers in place
    # (graphs captured earlier stay valid), then the base copied back: base audio before == base audio after
    from lib import audiocraft_checkpoint as ac
    engine = service.engines["small"]
    def perturb(key, v):  # every LM tensor moved by half its std
        if v.numel() == 1 or not v.is_floating_point():
            return v
        g = torch.Generator().manual_seed(len(key))
        return v + 0.5 * v.float().std().to(v.dtype) * torch.randn(v.shape, generator=g).to(v.device, v.dtype)

    ft_path = ac.save_export(engine.model, Path(tempfile.mkdtemp()) / "state_dict.bin", perturb=perturb)
    try:
        req = dict(prompt="lofi beat", duration=3, model_version="small", seed=1)
        ft = soundfile.read(str(service.predict(Request.from_inputs(**req, replicate_weights=str(ft_path)))),
                            always_2d=True, dtype="float32")[0]
        again = soundfile.read(str(service.predict(Request.from_inputs(**req))), always_2d=True, dtype="float32")[0]
        base = audios.get("musicgen small 3 s")
        report["finetune_fast_path"] = {
            "fast_decoder_used": engine.fast is not None, "finetune_differs": bool(not np.array_equal(ft, base)),
            "base_again_identical": bool(np.array_equal(again, base)), "finite": bool(np.isfinite(ft).all())}
    except Exception as e:  # noqa: BLE001
        report["finetune_fast_path"] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
    print(json.dumps({"finetune_fast_path": report["finetune_fast_path"]}), flush=True)
    report["fused_snake"] = snake_check() if device == "cuda" else {"skipped": "CUDA only"}
    report["ace_step_dit"] = ace_dit_check() if device == "cuda" else {"skipped": "CUDA only"}
    print(json.dumps({"fused_snake": report["fused_snake"], "ace_step_dit": report["ace_step_dit"]}), flush=True)
    a, b, c = (audios.get(n) for n in ("musicgen small 3 s", "musicgen small 3 s, same seed",
                                       "musicgen small 3 s, other seed"))
    report["same_seed_same_audio"] = bool(a is not None and b is not None and np.array_equal(a, b))
    report["other_seed_other_audio"] = bool(a is not None and c is not None and not np.array_equal(a, c))
    fft = report["finetune_fast_path"]
    report["all_ok"] = all(c["ok"] for c in report["cases"]) and report["same_seed_same_audio"] and \
        report["other_seed_other_audio"] and all(fft.get(k) for k in ("fast_decoder_used", "finetune_differs",
                                                                       "base_again_identical", "finite")) and \
        report["fused_snake"].get("bf16_identical", device != "cuda") and \
        report["ace_step_dit"].get("ok", device != "cuda")
    (out_dir / "gpu_smoke.json").write_text(json.dumps(report, indent=2))
    print("all_ok", report["all_ok"], "same_seed", report["same_seed_same_audio"], "other_seed",
          report["other_seed_other_audio"])


if __name__ == "__main__":
    main()
