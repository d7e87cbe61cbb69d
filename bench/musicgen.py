"""MusicGen decode benchmark on a CUDA GPU: our FastMusicgen vs transformers' generate, in one process.

Random-init full-size configs (random weights cost exactly what real ones cost), CFG 3, top_k 250, fp16.
  python3 bench/musicgen.py                          # everything (see --help)
  python3 bench/musicgen.py --sizes small --secs 8 --hf small:8 --batches ""
Writes $OUT/musicgen-<gpu>.json (or --out DIR); copy it to bench/results/ and commit it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lib.musicgen_codes import CodesRequest, Sampling, decoding_steps, reference_generate_codes  # noqa: E402
from lib.musicgen_fast import FastMusicgen, race_multinomial  # noqa: E402
from lib.lstm import fused_lstm  # noqa: E402

# size -> (hidden, layers, heads, codebooks, channels)
SIZES = {"small": (1024, 24, 16, 4, 1), "medium": (1536, 48, 24, 4, 1), "large": (2048, 48, 32, 4, 1),
         "stereo-large": (2048, 48, 32, 8, 2)}
FLOOR_MS = {"small": 0.24, "medium": 1.07, "large": 1.89, "stereo-large": 1.89}  # ../shared/notes/performance.md


def build(size: str, dtype=torch.float16):
    from transformers import (EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration,
                              T5Config)

    h, L, H, K, ch = SIZES[size]
    dec = MusicgenDecoderConfig(vocab_size=2048, hidden_size=h, num_hidden_layers=L, num_attention_heads=H,
                                ffn_dim=4 * h, num_codebooks=K, audio_channels=ch, max_position_embeddings=2048,
                                pad_token_id=2048, bos_token_id=2048, decoder_start_token_id=2048)
    t5 = T5Config(vocab_size=32128, d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64)
    enc = EncodecConfig(sampling_rate=32000, audio_channels=1, num_filters=64, hidden_size=128,
                        upsampling_ratios=[8, 5, 4, 4], codebook_size=2048, target_bandwidths=[2.2],
                        use_causal_conv=False, normalize=False, num_lstm_layers=2, compress=2)
    cfg = MusicgenConfig(text_encoder=t5.to_dict(), audio_encoder=enc.to_dict(), decoder=dec.to_dict())
    with torch.device("cuda"):
        model = MusicgenForConditionalGeneration(cfg)
    model = model.to(dtype).eval()
    g = model.generation_config
    g.decoder_start_token_id = g.pad_token_id = g.bos_token_id = 2048
    g.do_sample, g.guidance_scale, g.top_k, g.max_length = True, 3.0, 250, 1500
    return model


def request(batch, secs, seed=0, top_k=250, tokens=12, guidance=3.0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32000, (batch, tokens), generator=g).cuda()
    return CodesRequest(input_ids=ids, attention_mask=torch.ones_like(ids), new_frames=secs * 50,
                        sampling=Sampling(top_k=top_k, guidance_scale=guidance))


def sync():
    torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def clip_wall(fast, secs, top_k=250, runs=2):
    """(codes, best wall s) of a batch-1 clip on `fast`, after one untimed call (graph capture, compilation)."""
    fast.generate_codes(request(1, secs, top_k=top_k), torch.Generator(device="cuda").manual_seed(0))
    best = None
    for _ in range(runs):
        codes, dt = timed(lambda: fast.generate_codes(request(1, secs, top_k=top_k),
                                                       torch.Generator(device="cuda").manual_seed(1)))
        best = dt if best is None else min(best, dt)
    return codes, best


def race_reference(model, req, seed):
    """transformers' generate with torch.multinomial replaced by the exponential race drawing from `seed`."""
    orig = torch.multinomial
    torch.multinomial = race_multinomial(torch.Generator(device="cuda").manual_seed(seed))
    try:
        return reference_generate_codes(model, req)
    finally:
        torch.multinomial = orig


def codes_with(flag, value, model, req, seed, dtype, **kw):
    """Codes of `req` from a fresh FastMusicgen with lib.musicgen_fast.<flag> = value during the call."""
    import lib.musicgen_fast as mf

    saved = getattr(mf, flag)
    setattr(mf, flag, value)
    try:
        fast = FastMusicgen(model, "cuda", dtype, **kw)
        return fast.generate_codes(req, torch.Generator(device="cuda").manual_seed(seed))
    finally:
        setattr(mf, flag, saved)


def gpu_check(log):
    """Correctness on the GPU before timing: (1) full-size small in fp32, our graphs vs transformers' generate
    with the same exponential-race noise (noise_chunk=1 draws exactly what the patched multinomial draws):
    tokens must be equal; (2) fp16: graphs vs our eager path, same noise: tokens equal."""
    res = {}
    import lib.musicgen_fast as mf

    if mf.triton is not None:  # the Triton kernels against torch on random data, output poisoned first
        torch.manual_seed(0)
        rows, H, T, hd, pos = 4, 16, 700, 64, 611
        q, kn, vn = (torch.randn(rows, H, hd, device="cuda", dtype=torch.float16) for _ in range(3))
        kc, vc = (torch.randn(rows, H, T, hd, device="cuda", dtype=torch.float16) for _ in range(2))
        kref, vref = kc.clone(), vc.clone()
        kref[:, :, pos], vref[:, :, pos] = kn, vn
        ref = F.scaled_dot_product_attention(q[:, :, None].float(), kref[:, :, :pos + 1].float(),
                                             vref[:, :, :pos + 1].float())[:, :, 0]
        out = torch.full_like(q, float("nan"))
        mf._triton_attend(q, kc, vc, out, pos=torch.tensor([pos], device="cuda"), kn=kn, vn=vn)
        res["triton_self_attn_rel_err"] = float((out.float() - ref).norm() / ref.norm())
        res["triton_self_attn_kv_written"] = bool(torch.equal(kc[:, :, pos], kn) and torch.equal(vc[:, :, pos], vn))
        for p_ in (0, 3, 64, 611):  # split kernel (default) vs single-pass kernel, short and long caches
            kc2, vc2 = kref.clone(), vref.clone()
            r1, r2 = torch.full_like(q, float("nan")), torch.full_like(q, float("nan"))
            pt = torch.tensor([p_], device="cuda")
            mf._triton_attend(q, kc2, vc2, r1, pos=pt, kn=kn, vn=vn)
            mf._triton_attend(q, kc2.clone(), vc2.clone(), r2, pos=pt, kn=kn, vn=vn, nsplit=1)
            kx, vx = kref.clone(), vref.clone()
            kx[:, :, p_], vx[:, :, p_] = kn, vn
            ref_ = F.scaled_dot_product_attention(q[:, :, None].float(), kx[:, :, :p_ + 1].float(),
                                                  vx[:, :, :p_ + 1].float())[:, :, 0]
            res[f"triton_split_attn_rel_err_pos{p_}"] = float((r1.float() - ref_).norm() / ref_.norm())
            res[f"triton_single_attn_rel_err_pos{p_}"] = float((r2.float() - ref_).norm() / ref_.norm())
        S = 40
        mask = torch.rand(rows, S, device="cuda") > 0.3
        mask[:, 0] = True
        ref = F.scaled_dot_product_attention(q[:, :, None].float(), kc[:, :, :S].float(), vc[:, :, :S].float(),
                                             attn_mask=mask[:, None, None])[:, :, 0]
        out = torch.full_like(q, float("nan"))
        mf._triton_attend(q, kc[:, :, :S], vc[:, :, :S], out, bias=torch.where(mask, 0.0, -1e30), n=S)
        res["triton_cross_attn_rel_err"] = float((out.float() - ref).norm() / ref.norm())
        x = torch.randn(2, 2048, device="cuda", dtype=torch.float16)
        w, b = torch.randn(2048, device="cuda", dtype=torch.float16), torch.randn(2048, device="cuda", dtype=torch.float16)
        ref = F.layer_norm(x.float(), (2048,), w.float(), b.float(), 1e-5)
        res["triton_layer_norm_rel_err"] = float((mf._triton_layer_norm(x, w, b, 1e-5).float() - ref).norm() / ref.norm())
        # fused decode-step kernels: GEMV with layer norm / GELU / residual, fused split self-attention
        for M in (1, 2, 16):
            K_, N_ = 2048, 6144
            x = torch.randn(M, K_, device="cuda", dtype=torch.float16)
            wt = torch.randn(N_, K_, device="cuda", dtype=torch.float16) * K_ ** -0.5
            lw, lb = torch.randn(K_, device="cuda", dtype=torch.float16), torch.randn(K_, device="cuda", dtype=torch.float16)
            r_ = torch.randn(M, N_, device="cuda", dtype=torch.float16)
            xn = F.layer_norm(x.float(), (K_,), lw.float(), lb.float(), 1e-5).half().float()
            for tag, kw, ref in (("plain", {}, x.float() @ wt.float().t()),
                                 ("ln_gelu", dict(ln=(lw, lb), gelu=True), F.gelu(xn @ wt.float().t())),
                                 ("res", dict(res=r_), r_.float() + x.float() @ wt.float().t())):
                out = torch.full((M, N_), float("nan"), device="cuda", dtype=torch.float16)
                mf._gemv(x, wt, out=out, **kw)
                res[f"triton_gemv_{tag}_m{M}_rel_err"] = float((out.float() - ref).norm() / ref.norm())
        for p_ in (0, 3, 611):
            kx, vx = kref.clone(), vref.clone()
            kx[:, :, p_], vx[:, :, p_] = kn, vn
            ref_ = F.scaled_dot_product_attention(q[:, :, None].float(), kx[:, :, :p_ + 1].float(),
                                                  vx[:, :, :p_ + 1].float())[:, :, 0]
            # the step's setting (as a programmatic dependent where supported: first block loaded before the wait)
            nsplit, block_t, nw = mf.SELF_ATTN_SPLIT
            for tag, kw in (("", dict(nsplit=8)), ("_step", dict(nsplit=nsplit, block_t=block_t, num_warps=nw,
                                                                 pdl=mf._pdl_ok(q.device)))):
                kc2, vc2 = kref.clone(), vref.clone()
                cnt = torch.zeros(rows * H, dtype=torch.int32, device="cuda")
                r1 = torch.full_like(q, float("nan"))
                mf._self_attend_fused(q, kc2, vc2, r1, torch.tensor([p_], device="cuda"), kn, vn, cnt, **kw)
                res[f"triton_fused_attn{tag}_rel_err_pos{p_}"] = float((r1.float() - ref_).norm() / ref_.norm())
                res[f"triton_fused_attn{tag}_ok_pos{p_}"] = bool(
                    torch.equal(kc2[:, :, p_], kn) and torch.equal(vc2[:, :, p_], vn) and int(cnt.abs().sum()) == 0)
        # folded cross-attention (one conditioned row): two GEMVs against _fold_cross_attention's matrices
        # against the query GEMV, masked attention and output GEMV, for a power-of-two and another head count
        for H_, S_, n_ in ((16, 32, 12), (24, 32, 30), (32, 64, 64)):
            D_ = H_ * 64
            wq, wo = (torch.randn(D_, D_, device="cuda", dtype=torch.float16) * D_ ** -0.5 for _ in range(2))
            k_, v_ = (torch.randn(H_, S_, 64, device="cuda", dtype=torch.float16) for _ in range(2))
            valid = torch.arange(S_, device="cuda") < n_
            k_[:, ~valid], v_[:, ~valid] = 0, 0
            lw, lb = torch.randn(D_, device="cuda", dtype=torch.float16), torch.randn(D_, device="cuda", dtype=torch.float16)
            h_ = torch.randn(2, D_, device="cuda", dtype=torch.float16)
            y_ = F.layer_norm(h_[:1].float(), (D_,), lw.float(), lb.float(), 1e-5)
            a_ = F.scaled_dot_product_attention((y_ @ wq.float().t()).view(1, H_, 1, 64), k_[None].float(),
                                                v_[None].float(), attn_mask=valid.view(1, 1, 1, S_))
            ref = a_.reshape(1, D_) @ wo.float().t()
            fq, fo = torch.empty(H_ * S_, D_, device="cuda", dtype=torch.float16), torch.empty_like(wq[:, :H_ * S_])
            mf._fold_cross_attention(k_, v_, wq, wo, fq, fo)
            out = h_.clone()
            sc = torch.full((1, H_ * S_), float("nan"), device="cuda")
            mf._gemv(out[:1], fq, ln=(lw, lb), out=sc)
            mf._gemv(sc, fo, res=out[:1], out=out[:1], softmax=(torch.where(valid, 0.0, -1e30), S_))
            res[f"triton_folded_cross_attn_h{H_}_s{S_}_rel_err"] = float((out[:1].float() - h_[:1].float() - ref).norm() / ref.norm())
            res[f"triton_folded_cross_attn_h{H_}_s{S_}_row1_kept"] = bool(torch.equal(out[1], h_[1]))
            # the scores GEMV before the norm (CROSS_LN_FOLD): h_ is h_in + attn @ wos^T, the GEMV reads [attn | h_in]
            wos = torch.randn(D_, D_, device="cuda", dtype=torch.float16) * D_ ** -0.5
            att = torch.randn(1, D_, device="cuda", dtype=torch.float16)
            cat = torch.cat([att, (h_[:1].float() - att.float() @ wos.float().t()).half()], dim=1)
            fr = torch.empty(H_ * S_, 2 * D_, device="cuda", dtype=torch.float16)
            fb = torch.empty(H_ * S_, device="cuda")
            mf._fold_cross_attention(k_, v_, wq, wo, fq, fo, ln=(lw, lb), wo_self=wos, fold_r=fr, fold_b=fb)
            hb = torch.cat([h_[:1], h_]).clone()
            sc = torch.full((1, H_ * S_), float("nan"), device="cuda")
            mf._gemv(cat, fr, out=sc)
            mf._gemv(sc, fo, res=hb[1:2], out=hb[:1], softmax=(torch.where(valid, 0.0, -1e30), S_), lnstat=fb)
            res[f"triton_ln_folded_cross_attn_h{H_}_s{S_}_rel_err"] = float((hb[:1].float() - h_[:1].float() - ref).norm() / ref.norm())
        log(json.dumps({"kernel_check": res}))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = build("small", torch.float32)
    req = request(2, 1, seed=1)
    req.new_frames = 40
    ref = race_reference(model, req, 5)
    fast = FastMusicgen(model, "cuda", torch.float32, noise_chunk=1)
    ours = fast.generate_codes(req, torch.Generator(device="cuda").manual_seed(5))
    res["fp32_graph_vs_transformers_equal_tokens"] = bool(torch.equal(ref, ours))
    res["fp32_graph_vs_transformers_token_agreement"] = float((ref == ours).float().mean())
    unf = FastMusicgen(model, "cuda", torch.float32, noise_chunk=1, fused_step=False).generate_codes(
        req, torch.Generator(device="cuda").manual_seed(5))
    res["fp32_fused_vs_unfused_step_equal_tokens"] = bool(torch.equal(unf, ours))
    # batch 1 (the predictor's case): the fused step folds cross-attention (mf._fold_cross_attention); text buckets
    # of 16, 32 and 64 tokens, with CFG (2 rows) and without (1 row)
    for tokens, guidance in ((12, 3.0), (20, 1.0), (40, 3.0)):
        tag = f"fp32_batch1_{tokens}tok_cfg{guidance:g}"
        req1 = request(1, 1, seed=2, tokens=tokens, guidance=guidance)
        req1.new_frames = 40
        ref1 = race_reference(model, req1, 6)
        fast1 = FastMusicgen(model, "cuda", torch.float32, noise_chunk=1)
        ours1 = fast1.generate_codes(req1, torch.Generator(device="cuda").manual_seed(6))
        res[f"{tag}_cross_attention_folded"] = any(s.fold_q is not None for s in fast1._slots.values())
        res[f"{tag}_graph_vs_transformers_equal_tokens"] = bool(torch.equal(ref1, ours1))
        res[f"{tag}_graph_vs_transformers_token_agreement"] = float((ref1 == ours1).float().mean())
        plain = codes_with("CROSS_FOLD", False, model, req1, 6, torch.float32, noise_chunk=1)
        res[f"{tag}_folded_vs_unfolded_equal_tokens"] = bool(torch.equal(plain, ours1))
        res[f"{tag}_scores_before_norm"] = any(s.fold_r is not None for s in fast1._slots.values())
        plain = codes_with("CROSS_LN_FOLD", False, model, req1, 6, torch.float32, noise_chunk=1)
        res[f"{tag}_scores_before_norm_vs_after_equal_tokens"] = bool(torch.equal(plain, ours1))
        # the persistent step (lib/musicgen_persistent.py) against the same step as separate kernels
        res[f"{tag}_persistent"] = fast1.persistent is not None
        other = codes_with("PERSISTENT_STEP", not mf.PERSISTENT_STEP, model, req1, 6, torch.float32, noise_chunk=1)
        res[f"{tag}_persistent_vs_kernels_equal_tokens"] = bool(torch.equal(other, ours1))
        del fast1
    req1 = request(1, 1, seed=2)
    req1.new_frames = 40
    del fast
    model = model.half()
    for tag, r_ in (("", req), ("_batch1", req1)):
        a = FastMusicgen(model, "cuda", torch.float16).generate_codes(r_, torch.Generator(device="cuda").manual_seed(3))
        b = FastMusicgen(model, "cuda", torch.float16, use_cuda_graphs=False).generate_codes(
            r_, torch.Generator(device="cuda").manual_seed(3))
        res[f"fp16{tag}_graph_vs_eager_equal_tokens"] = bool(torch.equal(a, b))
        res[f"fp16{tag}_graph_vs_eager_token_agreement"] = float((a == b).float().mean())
        c = codes_with("PERSISTENT_STEP", not mf.PERSISTENT_STEP, model, r_, 3, torch.float16)
        res[f"fp16{tag}_persistent_vs_kernels_token_agreement"] = float((a == c).float().mean())
    log(json.dumps({"gpu_check": res}))
    del model
    torch.cuda.empty_cache()
    return res


def bench_size(size, secs_list, batches, hf_secs, attn_variants, log):
    out = {"size": size, "ours": [], "transformers": [], "stages": {}, "batched": []}
    t = time.perf_counter()
    model = build(size)
    sync()
    out["build_s"] = round(time.perf_counter() - t, 1)
    h, L, H, K, ch = SIZES[size]
    k_ch = K // ch
    for attn in attn_variants:
        t = time.perf_counter()
        fast = FastMusicgen(model, "cuda", torch.float16, attn=attn)
        sync()
        setup = time.perf_counter() - t
        for secs in secs_list:
            steps = decoding_steps(k_ch, secs * 50)
            gen = torch.Generator(device="cuda").manual_seed(0)
            _, first = timed(lambda: fast.generate_codes(request(1, secs), gen))
            walls = []
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            for rep in range(2):
                codes, dt = timed(lambda: fast.generate_codes(request(1, secs, seed=rep), gen))
                walls.append(dt)
            wall = statistics.median(walls)
            r = dict(impl="ours", attn=attn, size=size, seconds=secs, batch=1, steps=steps,
                     first_call_s=round(first, 3), capture_cost_s=round(first - wall, 3), wall_s=round(wall, 3),
                     walls=[round(w, 3) for w in walls], ms_per_step=round(wall / steps * 1000, 3),
                     rtf=round(secs / wall, 2), peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                     peak_over_weights_gb=round((torch.cuda.max_memory_allocated() - base) / 2**30, 2),
                     floor_ms_per_step=FLOOR_MS[size], x_floor=round(wall / steps * 1000 / FLOOR_MS[size], 2),
                     setup_s=round(setup, 2), shape=list(codes.shape))
            log(json.dumps(r))
            out["ours"].append(r)
        if attn == attn_variants[0]:
            # the other stages of a request, timed on the same model (30 s of audio)
            req = request(1, 30)
            te = model.text_encoder
            timed(lambda: te(input_ids=req.input_ids, attention_mask=req.attention_mask))
            _, t5 = timed(lambda: te(input_ids=req.input_ids, attention_mask=req.attention_mask).last_hidden_state)
            # as the decoder runs it (projected): eagerly, and replayed as a CUDA graph (TEXT_GRAPHS)
            graphs, fast.text_graphs = fast.text_graphs, False
            eager = fast._text_states(req)[0]
            _, t5_eager = timed(lambda: fast._text_states(req))
            fast.text_graphs = graphs
            fast._text_states(req)
            graphed, t5_graph = timed(lambda: fast._text_states(req)[0])
            codes = fast.generate_codes(req, torch.Generator(device="cuda").manual_seed(0))

            def encodec():  # as the predictor decodes: the LSTM through lib/lstm.py
                with torch.inference_mode(), fused_lstm(model.audio_encoder.decoder):
                    if ch == 1:
                        return model.audio_encoder.decode(codes[None], [None]).audio_values
                    return torch.cat([model.audio_encoder.decode(codes[None, :, i::2], [None]).audio_values
                                      for i in range(2)], 1)
            timed(encodec)
            wav, dec_s = timed(encodec)
            out["stages"] = dict(text_encoding_s=round(t5, 4), text_states_eager_s=round(t5_eager, 4),
                                 text_states_graph_s=round(t5_graph, 4), text_graph_used=fast.text_graphs,
                                 text_graph_max_err=float((graphed.float() - eager.float()).abs().max()),
                                 encodec_decode_30s_s=round(dec_s, 4),
                                 audio_shape=list(wav.shape))
            log(json.dumps({"size": size, "stages": out["stages"]}))
            for b in batches:
                gen = torch.Generator(device="cuda").manual_seed(0)
                secs = 30
                steps = decoding_steps(k_ch, secs * 50)
                _, first = timed(lambda: fast.generate_codes(request(b, secs), gen))
                torch.cuda.reset_peak_memory_stats()
                codes, wall = timed(lambda: fast.generate_codes(request(b, secs, seed=1), gen))
                r = dict(impl="ours", size=size, seconds=secs, batch=b, first_call_s=round(first, 3),
                         wall_s=round(wall, 3), ms_per_step=round(wall / steps * 1000, 3),
                         frames_per_s=round(b * secs * 50 / wall, 1), audio_s_per_s=round(b * secs / wall, 2),
                         peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2), shape=list(codes.shape))
                log(json.dumps(r))
                out["batched"].append(r)
        del fast
        torch.cuda.empty_cache()
    for secs in hf_secs:
        n = secs * 50
        ids = request(1, secs).input_ids
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=250, guidance_scale=3.0,
                  max_new_tokens=decoding_steps(k_ch, n))
        with torch.inference_mode():
            model.generate(**{**kw, "max_new_tokens": 20})
            torch.cuda.reset_peak_memory_stats()
            wav, dt = timed(lambda: model.generate(**kw))
        steps = kw["max_new_tokens"]
        r = dict(impl="transformers.generate", size=size, seconds=secs, batch=1, steps=steps, wall_s=round(dt, 2),
                 ms_per_step=round(dt / steps * 1000, 2), rtf=round(secs / dt, 3),
                 peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2), shape=list(wav.shape),
                 note="includes T5 and EnCodec decoding (generate always decodes audio)")
        log(json.dumps(r))
        out["transformers"].append(r)
    del model
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="small,medium,large,stereo-large")
    ap.add_argument("--secs", default="8,30")
    ap.add_argument("--batches", default="4,8")
    ap.add_argument("--hf", default="small:8,small:30,medium:8,large:8,stereo-large:8",
                    help="transformers generate runs, size:seconds")
    ap.add_argument("--attn", default="triton", help="comma list of decode attention variants to time (triton, sdpa, math)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = ap.parse_args()
    import transformers

    gpu = torch.cuda.get_device_name(0)
    slug = next((s for s in ("h100", "h200", "a100", "l40s", "a10g", "l4", "t4") if s in gpu.lower()), "gpu")
    results = dict(command="python3 " + " ".join(sys.argv), gpu=gpu, torch=torch.__version__,
                   transformers=transformers.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                   date=time.strftime("%Y-%m-%d %H:%M:%S"),
                   settings="random-init full-size configs, fp16, CFG 3, top_k 250, batch 1 unless noted",
                   check=None, models=[])
    Path(a.out).mkdir(parents=True, exist_ok=True)
    path = Path(a.out) / f"musicgen-{slug}.json"

    def log(line):
        print(line, flush=True)

    def save():
        path.write_text(json.dumps(results, indent=1))

    log(f"{gpu} torch {torch.__version__} transformers {transformers.__version__}")
    if not a.no_check:
        results["check"] = gpu_check(log)
        save()
    hf = {}
    for item in filter(None, a.hf.split(",")):
        size, secs = item.split(":")
        hf.setdefault(size, []).append(int(secs))
    secs = [int(s) for s in a.secs.split(",") if s]
    batches = [int(b) for b in a.batches.split(",") if b]
    for size in a.sizes.split(","):
        results["models"].append(bench_size(size, secs, batches, hf.get(size, []), a.attn.split(","), log))
        save()
    # summary table
    log("\nsize | secs | ours wall s | ms/step | x floor | RTF | first call s | transformers ms/step | speed-up")
    for m in results["models"]:
        hf_ms = {r["seconds"]: r["ms_per_step"] for r in m["transformers"]}
        for r in m["ours"]:
            ref = hf_ms.get(r["seconds"]) or (next(iter(hf_ms.values())) if hf_ms else None)
            sp = round(ref / r["ms_per_step"], 1) if ref else None
            log(f"{m['size']} | {r['seconds']} | {r['wall_s']} | {r['ms_per_step']} | {r['x_floor']} | {r['rtf']} | "
                f"{r['first_call_s']} | {ref} | {sp}")
    save()
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
