"""replicate_weights: audiocraft-format MusicGen fine-tunes converted into our transformers model."""
from __future__ import annotations

import tarfile

import pytest
import torch

from lib import audiocraft_checkpoint as ac
from lib.errors import UserError
from lib.musicgen_codes import CodesRequest, Sampling, reference_generate_codes
from lib.tiny import _t5_tokenizer, build_musicgen


def _perturb(key, value):
    g = torch.Generator().manual_seed(abs(hash(key)) % 2**31)
    return value + 0.5 * value.std().nan_to_num(1.0) * torch.randn(value.shape, generator=g)


def _codes(model, seed=0):
    tok = _t5_tokenizer()(["lofi beat"], return_tensors="pt")
    req = CodesRequest(input_ids=tok.input_ids, attention_mask=tok.attention_mask, new_frames=20,
                       sampling=Sampling(top_k=20, guidance_scale=3.0))
    torch.manual_seed(seed)
    return reference_generate_codes(model, req)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setattr(ac, "CACHE_DIR", tmp_path / "cache")


def test_finetune_roundtrip_equals_perturbed_model(tmp_path):
    base = build_musicgen(seed=0)
    path = ac.save_export(base, tmp_path / "ft" / "state_dict.bin", perturb=_perturb)
    # the model the fine-tune describes: base with the same perturbation applied in our names
    target = build_musicgen(seed=0)
    dec, top = ac.to_transformers(ac.load_export(path)[1], target.decoder.config.hidden_size)
    target.decoder.load_state_dict(dec, strict=False)
    target.enc_to_dec_proj.load_state_dict({k.split(".", 1)[1]: v for k, v in top.items()})
    expected = _codes(target)

    before = {k: v.clone() for k, v in base.state_dict().items()}
    base_codes = _codes(base)
    ft = ac.FineTune.load(str(path), base)
    with ft.swapped_into(base):
        got = _codes(base)
    assert torch.equal(got, expected)
    assert not torch.equal(got, base_codes)  # the perturbation changes the music
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # base untouched after the prediction
    assert torch.equal(_codes(base), base_codes)


def test_conversion_is_exact_inverse():
    model = build_musicgen(seed=1, stereo=True)
    exported = ac.from_transformers(model)
    assert "transformer.layers.0.self_attn.in_proj_weight" in exported and "emb.0.weight" in exported
    assert "linears.7.weight" in exported and "out_norm.weight" in exported
    dec, top = ac.to_transformers(exported, model.decoder.config.hidden_size)
    ours = {k: v for k, v in model.decoder.state_dict().items() if "embed_positions" not in k}
    assert set(dec) == set(ours) and all(torch.equal(dec[k], ours[k]) for k in ours)
    assert set(top) == {"enc_to_dec_proj.weight", "enc_to_dec_proj.bias"}


def test_archive_cached_by_content(tmp_path):
    model = build_musicgen(seed=0)
    lm = ac.save_export(model, tmp_path / "out" / "state_dict.bin")
    archive = tmp_path / "training_output.tar"
    with tarfile.open(archive, "w") as t:
        t.add(lm, arcname="output/state_dict.bin")
    p1, d1 = ac.fetch_weights(str(archive))
    p2, d2 = ac.fetch_weights(str(archive))
    assert p1 == p2 and d1 == d2 and p1.read_bytes() == lm.read_bytes()


@pytest.mark.parametrize("case", ["missing", "truncated", "garbage", "wrong-size", "not-export", "scheme"])
def test_clear_errors(tmp_path, case):
    model = build_musicgen(seed=0)
    path = tmp_path / "state_dict.bin"
    if case == "missing":
        ref = str(tmp_path / "nope.bin")
    elif case == "truncated":
        data = ac.save_export(model, path).read_bytes()
        path.write_bytes(data[: len(data) // 2])
        ref = str(path)
    elif case == "garbage":
        path.write_bytes(b"not a checkpoint" * 100)
        ref = str(path)
    elif case == "wrong-size":
        ac.save_export(build_musicgen(seed=0, stereo=True), path)  # 8 codebooks vs the mono model's 4
        ref = str(path)
    elif case == "not-export":
        torch.save({"weights": torch.zeros(3)}, path)
        ref = str(path)
    else:
        ref = "file:///etc/passwd"
    with pytest.raises(UserError) as e:
        ac.FineTune.load(ref, model)
    assert e.value.field == "replicate_weights"
    assert {"missing": "does not exist", "truncated": "truncated", "garbage": "truncated",
            "wrong-size": "different MusicGen", "not-export": "not an audiocraft MusicGen export",
            "scheme": "only http(s)"}[case] in e.value.message


def test_predict_with_replicate_weights(predictor, tmp_path):
    from tests.conftest import predict, read_audio

    engine = predictor.service.engines["small"]
    path = ac.save_export(engine.model, tmp_path / "state_dict.bin", perturb=_perturb)
    base = read_audio(predict(predictor, prompt="lofi beat", duration=1.0, seed=5, model_version="small"))[0]
    ft = read_audio(predict(predictor, prompt="lofi beat", duration=1.0, seed=5, model_version="small",
                            replicate_weights=str(path)))[0]
    again = read_audio(predict(predictor, prompt="lofi beat", duration=1.0, seed=5, model_version="small"))[0]
    assert ft.shape == base.shape and not (ft == base).all()
    assert (again == base).all()


@pytest.mark.parametrize("arch", ["mono", "melody"])
def test_fast_decoder_reloads_finetune_in_place(arch, tmp_path, monkeypatch):
    """FastMusicgen.reload_weights: the fine-tune swapped into the model, then the base again, copied into the
    same buffers; the fast decoder's codes equal transformers' on each with the same noise."""
    from lib.musicgen_fast import FastMusicgen
    from tests.test_musicgen_fast import ARCHS, make_request, run_reference

    stereo, melody = ARCHS[arch]
    model = build_musicgen(stereo=stereo, melody=melody, seed=3)
    fast = FastMusicgen(model, device="cpu", dtype=torch.float32)
    buffers = [dest.data_ptr() for dest, _ in fast._weight_pairs()]
    req = make_request(model, arch, new_frames=10)

    def fast_codes():
        return fast.generate_codes(req, torch.Generator().manual_seed(7))

    base_ref, _ = run_reference(model, req, 7, monkeypatch)
    assert torch.equal(fast_codes(), base_ref)
    ft = ac.FineTune.load(str(ac.save_export(model, tmp_path / "state_dict.bin", perturb=_perturb)), model)
    with ft.swapped_into(model):
        fast.reload_weights()
        ft_ref, _ = run_reference(model, req, 7, monkeypatch)
        assert not torch.equal(ft_ref, base_ref)  # the fine-tune changes the music
        assert torch.equal(fast_codes(), ft_ref)
    fast.reload_weights()
    assert torch.equal(fast_codes(), base_ref)
    assert [dest.data_ptr() for dest, _ in fast._weight_pairs()] == buffers  # in place: graphs stay valid
    assert all(torch.equal(dest, src) for dest, src in fast._weight_pairs())
