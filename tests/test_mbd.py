"""Multi-Band Diffusion (lib.mbd) on a tiny random checkpoint in the published layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lib import mbd, tiny_mbd
from tests.conftest import predict, read_audio


class _RandomCodec:
    """A stand-in compression model: fixed random reference audio and embeddings per code tensor."""

    def decode(self, codes):
        g = torch.Generator().manual_seed(int(codes.sum()))
        return 0.1 * torch.randn(codes.shape[0], 1, codes.shape[-1] * 640, generator=g)

    def latent(self, codes):
        g = torch.Generator().manual_seed(int(codes.sum()) + 1)
        return torch.randn(codes.shape[0], 16, codes.shape[-1], generator=g)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.backends.mkldnn.enabled = False
    folder = tiny_mbd.write_mbd(tmp_path_factory.mktemp("mbd"))
    return mbd.MultiBandDiffusion.from_checkpoint(folder)


def test_loads_real_layout_weights_only(tmp_path):
    path = tiny_mbd.write_mbd(tmp_path) / mbd.CHECKPOINT_FILE
    with pytest.raises(Exception):  # the configs are omegaconf objects: a plain weights_only load refuses them
        torch.load(path, weights_only=True)
    pkg = mbd.load_weights_only(path)
    cfg = mbd.resolve(mbd.to_plain(pkg[2]["cfg"]))
    assert cfg["processor"]["use"] is True and cfg["processor"]["power_std"] == 0.4
    assert cfg["dataset"]["generate"]["audio"]["sample_rate"] == 32000  # ${sample_rate} resolved
    assert cfg["schedule"]["beta_exp"] == 7.5


def test_unet_weights_loaded_exactly(tiny, tmp_path):
    raw = tiny_mbd.build_checkpoint(seed=0)
    for b, band in enumerate(tiny.bands):
        ours = band.unet.state_dict()
        for k, v in raw[b]["model_state"].items():
            assert torch.equal(ours[k], v), k
    assert [b.processor is not None for b in tiny.bands] == [False, False, True, True]


@pytest.mark.parametrize("bottleneck", [{"transformer": False}, {"transformer": True}])
def test_unet_condition_reaches_the_output_through_the_deepest_skip(bottleneck):
    """audiocraft adds the EnCodec condition in place to the bottleneck tensor, which is also the deepest
    skip: without a transformer / BLSTM the bottleneck is zeroed and the skip is the ONLY way the codes reach
    the audio. (Our first version added it out of place: the conv-only U-Net ignored the codes, and parity
    with audiocraft was off by 4% of the signal's std.)"""
    torch.manual_seed(0)
    unet = mbd.DiffusionUNet(chin=1, hidden=8, depth=2, growth=2, kernel=8, stride=4, emb_all_layers=True,
                             codec_dim=16, **bottleneck).eval()
    x = torch.randn(1, 1, 2560)
    cond = torch.randn(1, 16, 4)
    with torch.no_grad():
        out = unet(x, 10, cond)
        z = x
        for i, enc in enumerate(unet.encoders):  # the deepest skip, computed by hand
            z = enc(z) + (unet.embedding if i == 0 else unet.embeddings[i - 1])(torch.tensor([10]))[:, :, None]
        deepest = z + torch.nn.functional.interpolate(unet.conv_codec(cond), z.shape[-1])
        assert not torch.allclose(out, unet(x, 10, torch.randn(1, 16, 4)))  # the codes matter
        if not bottleneck["transformer"]:  # bottleneck zeroed: the first decoder sees exactly the skip
            seen = []
            hook = unet.decoders[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
            unet(x, 10, cond)
            hook.remove()
            torch.testing.assert_close(seen[0], deepest, rtol=0, atol=0)


def test_schedule_matches_the_published_power_schedule():
    s = mbd.Schedule(beta_t0=1e-5, beta_t1=2.9e-2, beta_exp=7.5)
    coefs = s.coefficients()
    assert [c[0] for c in coefs] == list(range(999, 0, -50))
    betas = torch.linspace(1e-5 ** (1 / 7.5), 2.9e-2 ** (1 / 7.5), 1000, dtype=torch.float64) ** 7.5
    cum = torch.cumprod(1 - betas, 0)
    # first step: alpha = alpha_bar(999) / alpha_bar(949)
    alpha = cum[999] / cum[949]
    assert coefs[0][1] == pytest.approx(float(1 / alpha.sqrt()), rel=1e-4)
    assert coefs[-1][3] == 0.0 and all(c[3] > 0 for c in coefs[:-1])


def test_band_splitter_sums_to_input_and_separates():
    split = mbd.BandSplitter(32000, 8)
    t = torch.arange(32000) / 32000
    x = torch.sin(2 * torch.pi * 100 * t) + torch.sin(2 * torch.pi * 8000 * t)
    bands = split(x[None, None])
    assert bands.shape == (8, 1, 1, 32000)
    assert torch.allclose(bands.sum(0), x[None, None], atol=1e-5)
    energy = bands[..., 2000:-2000].pow(2).mean(dim=(1, 2, 3))
    assert energy[0] > 0.4 and energy[6] > 0.4 and energy[3] < 0.01  # 8 kHz: mel band 6 of 8


def test_decode_shapes_determinism_and_eq(tiny):
    codes = torch.randint(0, 64, (2, 4, 10))
    a = tiny.decode(codes, _RandomCodec(), generator=torch.Generator().manual_seed(0))
    b = tiny.decode(codes, _RandomCodec(), generator=torch.Generator().manual_seed(0))
    c = tiny.decode(codes, _RandomCodec(), generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 1, 6400) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # re-EQ: every one of the 32 bands has the reference's energy (joint over the batch)
    ref = _RandomCodec().decode(codes)
    ours, theirs = tiny.eq(a), tiny.eq(ref)
    assert torch.allclose(ours.flatten(1).std(1), theirs.flatten(1).std(1), rtol=2e-2)


def test_explicit_noise_is_used(tiny):
    codes = torch.randint(0, 64, (1, 4, 10))
    fixed = {}

    def noise(b, i, shape):
        return fixed.setdefault((b, i), torch.randn(shape))

    a = tiny.decode(codes, _RandomCodec(), noise=noise)
    b = tiny.decode(codes, _RandomCodec(), noise=noise)
    assert torch.equal(a, b)
    assert len(fixed) == 4 * 20  # per band: the initial noise and 19 posterior draws


@pytest.mark.parametrize("model,channels", [("small", 1), ("stereo-small", 2)])
def test_predict_with_multi_band_diffusion(predictor, model, channels):
    plain = predict(predictor, prompt="lofi beat", duration=1.0, seed=3, model_version=model,
                    normalization_strategy="clip")
    with_mbd = predict(predictor, prompt="lofi beat", duration=1.0, seed=3, model_version=model,
                       multi_band_diffusion=True, normalization_strategy="clip")
    a, sr = read_audio(plain)
    b, _ = read_audio(with_mbd)
    assert sr == 32000 and a.shape == b.shape == (channels, 32000)
    assert not np.allclose(a, b)  # a different decoder ran, on the same codes
    if channels == 2:
        assert not np.allclose(b[0], b[1])  # left and right decoded from their own code streams


def test_mbd_missing_weights_names_the_fetch_command(tiny_weights, tmp_path):
    import shutil

    from lib.errors import UserError
    from lib.request import Request
    from lib.service import Service

    weights = tmp_path / "w"
    shutil.copytree(tiny_weights / "musicgen-small", weights / "musicgen-small")
    service = Service(weights_dir=weights, device="cpu")
    assert service.mbd is None
    with pytest.raises(UserError) as e:
        service.predict(Request.from_inputs(prompt="x", duration=1.0, multi_band_diffusion=True))
    assert e.value.args and "script/download-weights multiband-diffusion" in str(e.value)
