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
    if value.numel() == 1:  # EnCodec's codebook `inited` flags
        return value
    g = torch.Generator().manual_seed(abs(hash(key)) % 2**31)
    return value + 0.5 * value.std() * torch.randn(value.shape, generator=g)


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
    p1, c1, d1 = ac.fetch_weights(str(archive))
    p2, c2, d2 = ac.fetch_weights(str(archive))
    assert p1 == p2 and d1 == d2 and p1.read_bytes() == lm.read_bytes()
    assert c1 is None and c2 is None  # no compression_state_dict.bin in it


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


# -- the compression model (compression_state_dict.bin) ---------------------------------------------------

def _audiocraft_codec(encodec, perturb=None) -> dict:
    """`encodec` (transformers) as audiocraft's EncodecModel.state_dict() names it, built module by module
    from audiocraft's layout: SEANet `model` Sequential (activations take indices too), StreamableConv1d ->
    NormConv1d `.conv` -> nn.Conv1d `.conv` under torch.nn.utils.weight_norm (weight_g / weight_v),
    StreamableConvTranspose1d -> `.convtr.convtr`, StreamableLSTM `.lstm`, ResidualVectorQuantizer
    `.vq.layers.<k>._codebook` buffers."""
    from transformers.models.encodec.modeling_encodec import (EncodecConv1d, EncodecConvTranspose1d, EncodecLSTM,
                                                              EncodecResnetBlock)
    out = {}

    def conv(prefix, module, wrapper):
        wn = module.conv.parametrizations.weight
        out[f"{prefix}.{wrapper}.{wrapper}.weight_g"] = wn.original0
        out[f"{prefix}.{wrapper}.{wrapper}.weight_v"] = wn.original1
        out[f"{prefix}.{wrapper}.{wrapper}.bias"] = module.conv.bias

    for part in ("encoder", "decoder"):
        for i, layer in enumerate(getattr(encodec, part).layers):
            prefix = f"{part}.model.{i}"
            if isinstance(layer, EncodecConvTranspose1d):
                conv(prefix, layer, "convtr")
            elif isinstance(layer, EncodecConv1d):
                conv(prefix, layer, "conv")
            elif isinstance(layer, EncodecLSTM):
                out.update({f"{prefix}.lstm.{n}": t for n, t in layer.lstm.named_parameters()})
            elif isinstance(layer, EncodecResnetBlock):
                for j, sub in enumerate(layer.block):
                    if isinstance(sub, EncodecConv1d):
                        conv(f"{prefix}.block.{j}", sub, "conv")
                if isinstance(layer.shortcut, EncodecConv1d):
                    conv(f"{prefix}.shortcut", layer.shortcut, "conv")
    for k, vq in enumerate(encodec.quantizer.layers):
        for name in ("inited", "cluster_size", "embed", "embed_avg"):
            out[f"quantizer.vq.layers.{k}._codebook.{name}"] = getattr(vq.codebook, name)
    return {k: (perturb(k, v) if perturb else v).detach().clone() for k, v in out.items()}


def _seanet_keys(n_ratios, n_residual, true_skip, n_q):
    """The parameter names of audiocraft's EncodecModel, from SEANetEncoder / SEANetDecoder's construction
    (audiocraft/modules/seanet.py), with weight_norm convolutions and an LSTM."""
    keys = []

    def conv(prefix, kind="conv"):
        keys.extend(f"{prefix}.{kind}.{kind}.{p}" for p in ("weight_g", "weight_v", "bias"))

    def resblock(prefix):
        conv(f"{prefix}.block.1")  # [ELU, conv(k=3), ELU, conv(k=1)]
        conv(f"{prefix}.block.3")
        if not true_skip:
            conv(f"{prefix}.shortcut")

    def lstm(prefix):
        keys.extend(f"{prefix}.lstm.{p}_l0" for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))

    i = 0
    conv(f"encoder.model.{i}")
    for _ in range(n_ratios):
        for _ in range(n_residual):
            i += 1
            resblock(f"encoder.model.{i}")
        i += 2  # ELU, downsampling conv
        conv(f"encoder.model.{i}")
    i += 1
    lstm(f"encoder.model.{i}")
    i += 2  # ELU, last conv
    conv(f"encoder.model.{i}")
    conv("decoder.model.0")
    lstm("decoder.model.1")
    i = 1
    for _ in range(n_ratios):
        i += 2  # ELU, upsampling transposed conv
        conv(f"decoder.model.{i}", "convtr")
        for _ in range(n_residual):
            i += 1
            resblock(f"decoder.model.{i}")
    conv(f"decoder.model.{i + 2}")
    keys += [f"quantizer.vq.layers.{k}._codebook.{b}" for k in range(n_q)
             for b in ("inited", "cluster_size", "embed", "embed_avg")]
    return set(keys)


def _codec_cfg(encodec, **changes) -> dict:
    """xp.cfg of an audiocraft compression solver for `encodec`, with OmegaConf references left unresolved
    as audiocraft's export writes them."""
    c = encodec.config
    cfg = {"compression_model": "encodec", "sample_rate": int(c.sampling_rate), "channels": int(c.audio_channels),
           "encodec": {"autoencoder": "seanet", "quantizer": "rvq", "sample_rate": "${sample_rate}",
                       "channels": "${channels}", "causal": False, "renormalize": False},
           "seanet": {"dimension": c.hidden_size, "channels": "${channels}", "causal": "${encodec.causal}",
                      "n_filters": c.num_filters, "n_residual_layers": c.num_residual_layers,
                      "ratios": list(c.upsampling_ratios), "activation": "ELU", "activation_params": {"alpha": 1.0},
                      "norm": "weight_norm", "norm_params": {}, "kernel_size": 7, "residual_kernel_size": 3,
                      "last_kernel_size": 7, "dilation_base": 2, "pad_mode": "constant",
                      "true_skip": not c.use_conv_shortcut, "compress": 2, "lstm": c.num_lstm_layers,
                      "disable_norm_outer_blocks": 0, "encoder": {},
                      "decoder": {"trim_right_ratio": 1.0, "final_activation": None,
                                  "final_activation_params": None}},
           "rvq": {"n_q": len(encodec.quantizer.layers), "q_dropout": False, "bins": c.codebook_size,
                   "decay": 0.99, "kmeans_init": True, "kmeans_iters": 50, "threshold_ema_dead_code": 2}}
    for dotted, value in changes.items():
        node = cfg
        *path, leaf = dotted.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return cfg


def _save_codec(path, state, cfg):
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"best_state": state, "xp.cfg": yaml.safe_dump(cfg), "version": "1.3.0", "exported": True}, path)
    return path


def _codec_finetune(model, folder, perturb_lm=True, codec=None):
    """A fine-tune folder as audiocraft exports it: state_dict.bin + compression_state_dict.bin (the tiny
    EnCodec, perturbed, unless `codec` is given: (state, cfg) or a raw package)."""
    ac.save_export(model, folder / ac.LM_FILE, perturb=_perturb if perturb_lm else None)
    if codec is None:
        codec = (_audiocraft_codec(model.audio_encoder, _perturb), _codec_cfg(model.audio_encoder))
    if isinstance(codec, tuple):
        _save_codec(folder / ac.COMPRESSION_FILE, *codec)
    else:
        torch.save(codec, folder / ac.COMPRESSION_FILE)
    return folder


def _tar(folder, archive):
    with tarfile.open(archive, "w") as t:
        for f in sorted(folder.iterdir()):
            t.add(f, arcname=f"output/{f.name}")
    return archive


def _encodec_variant(**changes):
    from transformers import EncodecConfig, EncodecModel

    base = build_musicgen(seed=0).audio_encoder.config.to_dict()
    base.update(changes)
    torch.manual_seed(0)
    return EncodecModel(EncodecConfig(**base)).eval()


def _decode(encodec, codes):
    with torch.no_grad():
        return encodec.decode(codes[None], audio_scales=[None]).audio_values


@pytest.mark.parametrize("variant", [{}, {"use_conv_shortcut": False, "num_lstm_layers": 2}])
def test_codec_layout_and_conversion(variant):
    """Our audiocraft-layout builder names exactly what SEANet's construction does, and the conversion maps
    every audiocraft tensor onto the transformers EnCodec, unchanged (conv shortcut or identity skip)."""
    encodec = _encodec_variant(**variant) if variant else build_musicgen(seed=0).audio_encoder
    c = encodec.config
    state = _audiocraft_codec(encodec, _perturb)
    expected = _seanet_keys(len(c.upsampling_ratios), c.num_residual_layers, not c.use_conv_shortcut,
                            len(encodec.quantizer.layers))
    if c.num_lstm_layers == 2:
        expected |= {k.replace("_l0", "_l1") for k in expected if ".lstm." in k}
    assert set(state) == expected
    ours = encodec.state_dict()
    converted = ac.fit_weight_norm(ac.codec_to_transformers(state), ours)
    ac.check_codec(converted, encodec)
    assert set(converted) == set(ours)
    fresh = _encodec_variant(**variant)
    fresh.load_state_dict(converted, strict=True)
    # the converted codec is the perturbed one, tensor for tensor
    mine = _audiocraft_codec(fresh)
    assert all(torch.equal(mine[k], state[k]) for k in state)


def test_codec_without_weight_norm_is_split():
    """A convolution exported without weight norm (audiocraft norm='none') becomes g = |w|, v = w."""
    encodec = build_musicgen(seed=0).audio_encoder
    state = _audiocraft_codec(encodec, _perturb)
    g, v = state.pop("decoder.model.0.conv.conv.weight_g"), state.pop("decoder.model.0.conv.conv.weight_v")
    state["decoder.model.0.conv.conv.weight"] = g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1)
    converted = ac.fit_weight_norm(ac.codec_to_transformers(state), encodec.state_dict())
    ac.check_codec(converted, encodec)
    fresh = _encodec_variant()
    fresh.load_state_dict(converted, strict=True)
    expected = _encodec_variant()
    expected.load_state_dict(ac.fit_weight_norm(ac.codec_to_transformers(_audiocraft_codec(encodec, _perturb)),
                                                encodec.state_dict()))
    codes = torch.randint(0, 64, (1, 4, 30), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_decode(fresh, codes), _decode(expected, codes), rtol=1e-5, atol=1e-6)


def test_finetune_swaps_the_codec_in_and_back(tmp_path):
    model = build_musicgen(seed=0)
    before = {k: v.clone() for k, v in model.audio_encoder.state_dict().items()}
    codes = torch.randint(0, 64, (1, 4, 40), generator=torch.Generator().manual_seed(1))
    base_audio = _decode(model.audio_encoder, codes)
    ft = ac.FineTune.load(str(_tar(_codec_finetune(model, tmp_path / "ft"), tmp_path / "ft.tar")), model)
    assert ft.codec_state is not None
    direct = _encodec_variant()
    direct.load_state_dict(ft.codec_state, strict=True)  # the converted codec, on its own
    with ft.swapped_into(model):
        got = _decode(model.audio_encoder, codes)
    assert torch.equal(got, _decode(direct, codes))
    assert not torch.allclose(got, base_audio)
    after = model.audio_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(_decode(model.audio_encoder, codes), base_audio)


def test_pretrained_codec_reference_keeps_the_base(tmp_path):
    model = build_musicgen(seed=0)
    logs = []
    folder = _codec_finetune(model, tmp_path / "ft", codec={"pretrained": "facebook/encodec_32khz",
                                                            "exported": True, "version": "1.3.0"})
    ft = ac.FineTune.load(str(folder), model, logs.append)
    assert ft.codec_state is None and ft.decoder_state
    assert any("keeping the base model's EnCodec" in m for m in logs)


@pytest.mark.parametrize("case", ["truncated", "not-export", "other-codec", "wider", "causal", "n_q", "foreign-key"])
def test_codec_clear_errors(tmp_path, case):
    model = build_musicgen(seed=0)
    enc = model.audio_encoder
    folder = tmp_path / "ft"
    if case == "truncated":
        _codec_finetune(model, folder)
        data = (folder / ac.COMPRESSION_FILE).read_bytes()
        (folder / ac.COMPRESSION_FILE).write_bytes(data[: len(data) // 2])
    elif case == "not-export":
        _codec_finetune(model, folder, codec={"weights": torch.zeros(3)})
    elif case == "other-codec":
        _codec_finetune(model, folder, codec={"pretrained": "dac_44khz", "exported": True})
    elif case == "wider":  # an EnCodec with twice the filters, its config saying so
        wide = _encodec_variant(num_filters=8)
        _codec_finetune(model, folder, codec=(_audiocraft_codec(wide), _codec_cfg(wide)))
    elif case == "causal":
        _codec_finetune(model, folder, codec=(_audiocraft_codec(enc), _codec_cfg(enc, **{"encodec.causal": True})))
    elif case == "n_q":  # config silent, one codebook too many
        state = _audiocraft_codec(enc)
        state.update({k.replace("layers.3.", "layers.4."): v for k, v in state.items() if ".layers.3." in k})
        cfg = _codec_cfg(enc)
        del cfg["rvq"]["n_q"]
        _codec_finetune(model, folder, codec=(state, cfg))
    else:
        state = _audiocraft_codec(enc)
        state["quantizer.vq.layers.0.project_in.weight"] = torch.zeros(16, 16)
        _codec_finetune(model, folder, codec=(state, _codec_cfg(enc)))
    with pytest.raises(UserError) as e:
        ac.FineTune.load(str(_tar(folder, tmp_path / "ft.tar")), model)
    assert e.value.field == "replicate_weights"
    assert {"truncated": "cannot read compression_state_dict.bin (truncated",
            "not-export": "not an audiocraft compression model export",
            "other-codec": "names the compression model 'dac_44khz'",
            "wider": "seanet.n_filters=8, the loaded model has 4",
            "causal": "encodec.causal=True, the loaded model has False",
            "n_q": "unknown ['quantizer.layers.4.codebook.inited'",
            "foreign-key": "unknown ['quantizer.vq.layers.0.project_in.weight']"}[case] in e.value.message


def test_predict_with_a_finetuned_codec(predictor, tmp_path, monkeypatch):
    """A prediction with LM + EnCodec decodes its codes with the converted EnCodec, and leaves the base
    EnCodec in place after."""
    from tests.conftest import predict

    engine = predictor.service.engines["small"]
    before = {k: v.clone() for k, v in engine.model.audio_encoder.state_dict().items()}
    lm_only = tmp_path / "lm"
    ac.save_export(engine.model, lm_only / ac.LM_FILE, perturb=_perturb)
    archive = _tar(_codec_finetune(engine.model, tmp_path / "both"), tmp_path / "both.tar")
    calls = []
    decode = engine.decode_codes
    monkeypatch.setattr(engine, "decode_codes", lambda codes, *a: calls.append((codes, decode(codes, *a)))
                        or calls[-1][1])
    args = dict(prompt="lofi beat", duration=1.0, seed=5, model_version="small")
    predict(predictor, replicate_weights=str(lm_only), **args)
    predict(predictor, replicate_weights=str(archive), **args)
    (codes_lm, audio_lm), (codes_ft, audio_ft) = calls
    assert torch.equal(codes_lm, codes_ft)  # the same LM: the codec alone changes the audio
    assert not (audio_lm == audio_ft).all()
    direct = _encodec_variant()
    direct.load_state_dict(predictor.service._finetune[2].codec_state, strict=True)
    assert (_decode(direct, codes_ft)[0, 0].numpy() == audio_ft[0]).all()
    after = engine.model.audio_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (decode(codes_ft) == audio_lm).all()  # the base codec decodes again


def test_predict_finetune_with_the_fast_decoder(predictor, tmp_path, monkeypatch):
    """The service runs a fine-tune on the fast decoder (reloaded in place, then back to the base): the
    same audio as a fast decoder built on the fine-tuned model, and the base audio after."""
    from lib.musicgen_fast import FastMusicgen
    from tests.conftest import predict, read_audio

    engine = predictor.service.engines["small"]
    monkeypatch.setattr(engine, "fast", FastMusicgen(engine.model, device="cpu"))
    fast = engine.fast
    args = dict(prompt="lofi beat", duration=1.0, seed=5, model_version="small")
    base = read_audio(predict(predictor, **args))[0]
    archive = _tar(_codec_finetune(engine.model, tmp_path / "ft"), tmp_path / "ft.tar")
    ft = ac.FineTune.load(str(archive), engine.model)
    with ft.swapped_into(engine.model):
        monkeypatch.setattr(engine, "fast", FastMusicgen(engine.model, device="cpu"))  # built on the fine-tune
        expected = read_audio(predict(predictor, **args))[0]
    monkeypatch.setattr(engine, "fast", fast)
    got = read_audio(predict(predictor, replicate_weights=str(archive), **args))[0]
    assert (got == expected).all() and not (got == base).all()
    assert (read_audio(predict(predictor, **args))[0] == base).all()
    assert all(torch.equal(dest, src) for dest, src in fast._weight_pairs())  # base weights back in place
