"""Parity of our MusicGen decoder (lib/musicgen_fast.py, eager on the CPU) with transformers' generate.

Tiny random weights (lib.tiny), fp32. For each architecture we run transformers' generate through
`reference_generate_codes` with `torch.multinomial` replaced by the exponential race drawing from a
seeded generator (the same draws, in the same order, our decoder makes), and compare per step the raw
logits of every row (conditional and unconditional) and the final codes."""
import pytest
import torch

from lib.musicgen_codes import CodesRequest, Sampling, decoding_steps, reference_generate_codes
from lib.musicgen_fast import FastMusicgen, race_multinomial
from lib.tiny import build_musicgen

ARCHS = {"mono": (False, False), "stereo": (True, False), "melody": (False, True), "stereo-melody": (True, True)}
_MODELS = {}


def model_for(arch):
    if arch not in _MODELS:
        stereo, melody = ARCHS[arch]
        _MODELS[arch] = build_musicgen(stereo=stereo, melody=melody, seed=3)
    return _MODELS[arch]


def make_request(model, arch, new_frames=10, sampling=None, prompt_frames=0, seed=0, batch=2):
    g = torch.Generator().manual_seed(1000 + seed)
    ids = torch.randint(3, 40, (batch, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1:, 4:] = 0  # a padded second prompt: the masks must matter
    ids[1:, 4:] = 0
    dec = model.decoder.config
    prompt = None
    if prompt_frames:
        prompt = torch.randint(0, dec.vocab_size, (batch, dec.num_codebooks, prompt_frames), generator=g)
    chroma = None
    if ARCHS[arch][1]:
        chroma = torch.nn.functional.one_hot(torch.randint(0, 12, (batch, 40), generator=g), 12).float()
    return CodesRequest(input_ids=ids, attention_mask=mask, new_frames=new_frames,
                        sampling=sampling or Sampling(top_k=20, guidance_scale=3.0), prompt_codes=prompt,
                        chroma=chroma)


def run_reference(model, req, seed, monkeypatch):
    """transformers' generate with the exponential-race sampler; returns (codes, raw logits per step)."""
    logits = []
    hook = model.decoder.register_forward_hook(lambda m, a, out: logits.append(out.logits[:, -1].float().clone()))
    with monkeypatch.context() as mp:
        mp.setattr(torch, "multinomial", race_multinomial(torch.Generator().manual_seed(seed)))
        try:
            codes = reference_generate_codes(model, req)
        finally:
            hook.remove()
    return codes, logits


def run_fast(model, req, seed):
    fast = FastMusicgen(model, device="cpu", dtype=torch.float32)
    logits = []
    fast.on_logits = lambda lg: logits.append(lg.float().reshape(-1, fast.V).clone())
    codes = fast.generate_codes(req, torch.Generator().manual_seed(seed))
    return codes, logits


def assert_parity(model, req, monkeypatch, seed=7, atol=2e-4):
    ref_codes, ref_logits = run_reference(model, req, seed, monkeypatch)
    codes, logits = run_fast(model, req, seed)
    k_ch = model.decoder.config.num_codebooks // model.decoder.config.audio_channels
    steps = decoding_steps(k_ch, req.new_frames)
    # transformers 5.2x runs the prefill forward twice (generate() and _sample() each call _prefill): drop
    # the exact duplicate so that entry i is the forward that produced step i's token
    while len(ref_logits) > steps and torch.equal(ref_logits[0], ref_logits[1]):
        ref_logits.pop(0)
    assert len(logits) == steps and len(ref_logits) >= steps
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        assert a.shape == b.shape, (step, a.shape, b.shape)
        err = (a - b).abs().max().item()
        assert err < atol, f"step {step}: logits differ by {err}"
    assert codes.shape == ref_codes.shape
    assert torch.equal(codes.cpu(), ref_codes.cpu())
    return codes


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sampled_tokens_and_logits_match_transformers(arch, monkeypatch):
    model = model_for(arch)
    req = make_request(model, arch, new_frames=10)
    codes = assert_parity(model, req, monkeypatch)
    k = model.decoder.config.num_codebooks
    assert codes.shape == (2, k, 10)
    assert len(torch.unique(codes)) > 5  # sampled, not constant


@pytest.mark.parametrize("arch", ["mono", "stereo", "melody"])
def test_greedy_tokens_match(arch, monkeypatch):
    model = model_for(arch)
    req = make_request(model, arch, new_frames=8, sampling=Sampling(top_k=1, guidance_scale=3.0), seed=1)
    a = assert_parity(model, req, monkeypatch, seed=1)
    b = assert_parity(model, req, monkeypatch, seed=2)  # greedy: the noise must not matter
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["mono", "stereo", "melody"])
def test_continuation_keeps_prompt_codes(arch, monkeypatch):
    model = model_for(arch)
    req = make_request(model, arch, new_frames=6, prompt_frames=5, seed=2)
    codes = assert_parity(model, req, monkeypatch, seed=3)
    assert codes.shape[-1] == 11
    assert torch.equal(codes[..., :5], req.prompt_codes)


def test_top_p_temperature_no_cfg(monkeypatch):
    model = model_for("mono")
    req = make_request(model, "mono", new_frames=8, sampling=Sampling(top_k=0, top_p=0.8, temperature=0.7,
                                                                     guidance_scale=1.0), seed=3)
    assert_parity(model, req, monkeypatch, seed=4)
    req = make_request(model, "stereo", new_frames=8, sampling=Sampling(top_k=30, top_p=0.9, temperature=1.3,
                                                                       guidance_scale=2.0), seed=4)
    assert_parity(model_for("stereo"), req, monkeypatch, seed=5)


def test_melody_conditioning_matters(monkeypatch):
    """The chroma must change the tokens, in transformers (cf. transformers #45647) and in ours alike. Random
    init makes the chroma projection tiny, so it is widened here."""
    model = build_musicgen(melody=True, seed=4)
    with torch.no_grad():
        model.audio_enc_to_dec_proj.weight.mul_(50)
    req = make_request(model, "melody", new_frames=8, seed=5)
    a = assert_parity(model, req, monkeypatch, seed=9)
    req.chroma = torch.roll(req.chroma, 3, dims=-1)
    b = assert_parity(model, req, monkeypatch, seed=9)
    assert not torch.equal(a, b)


def test_comparison_can_fail(monkeypatch):
    """A one-weight change in our copy must be caught by the logits comparison."""
    model = model_for("mono")
    req = make_request(model, "mono", new_frames=4, seed=6)
    ref_codes, ref_logits = run_reference(model, req, 11, monkeypatch)
    fast = FastMusicgen(model, device="cpu", dtype=torch.float32)
    fast.layers[0].fc2[0, 0] += 0.5
    logits = []
    fast.on_logits = lambda lg: logits.append(lg.reshape(-1, fast.V).clone())
    fast.generate_codes(req, torch.Generator().manual_seed(11))
    assert (logits[0] - ref_logits[0]).abs().max() > 1e-3


def test_progress_and_cancel():
    model = model_for("mono")
    seen = []
    req = make_request(model, "mono", new_frames=6, seed=7)
    req.on_step = lambda done, total: seen.append((done, total))
    fast = FastMusicgen(model, device="cpu")
    fast.generate_codes(req, torch.Generator().manual_seed(0))
    steps = decoding_steps(4, 6)
    assert seen == [(i, steps) for i in range(1, steps + 1)]

    class Cancelled(Exception):
        pass

    def cancel(done, total):
        if done == 3:
            raise Cancelled

    req.on_step = cancel
    with pytest.raises(Cancelled):
        fast.generate_codes(req, torch.Generator().manual_seed(0))
    req.on_step = None  # the next request works
    assert fast.generate_codes(req, torch.Generator().manual_seed(0)).shape == (2, 4, 6)


def test_one_decoder_serves_requests_of_other_shapes(monkeypatch):
    """Buffers are cached per (batch, rows, text length): a batch-1 request with CFG (2 rows) must not leave
    its buffers to a batch-2 request without CFG (also 2 rows)."""
    model = model_for("mono")
    fast = FastMusicgen(model, device="cpu", dtype=torch.float32)
    first = make_request(model, "mono", new_frames=6, seed=8, batch=1)
    assert fast.generate_codes(first, torch.Generator().manual_seed(1)).shape == (1, 4, 6)
    req = make_request(model, "mono", new_frames=6, seed=9, sampling=Sampling(top_k=20, guidance_scale=1.0))
    ref, _ = run_reference(model, req, 12, monkeypatch)
    assert torch.equal(fast.generate_codes(req, torch.Generator().manual_seed(12)), ref)


def test_folded_cross_attention_matches_attention():
    """The fused CUDA step folds cross-attention into two GEMVs against per-request matrices
    (musicgen_fast._fold_cross_attention): scores = LN(h) @ fold_q^T, a masked softmax per head over the text,
    then @ fold_o^T. On the CPU, the same matrices must give the query projection, masked attention and output
    projection of the unfolded path (layout: score h * S + s is head h, text token s)."""
    from lib.musicgen_fast import _fold_cross_attention

    torch.manual_seed(0)
    H, S, hd, n_text = 4, 32, 16, 19
    D = H * hd
    wq, wo = torch.randn(D, D) / D ** 0.5, torch.randn(D, D) / D ** 0.5
    k, v = torch.randn(H, S, hd), torch.randn(H, S, hd)
    valid = torch.arange(S) < n_text
    y = torch.randn(1, D)
    q = (y @ wq.t()).view(1, H, 1, hd)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k[None], v[None], attn_mask=valid.view(1, 1, 1, S))
    ref = ref.reshape(1, D) @ wo.t()
    fold_q, fold_o = torch.empty(H * S, D), torch.empty(D, H * S)
    _fold_cross_attention(k, v, wq, wo, fold_q, fold_o)
    scores = (y @ fold_q.t()).view(H, S) + torch.where(valid, 0.0, -1e30)
    out = scores.softmax(-1).reshape(1, H * S) @ fold_o.t()
    assert (out - ref).abs().max() < 1e-5 * ref.abs().max()
