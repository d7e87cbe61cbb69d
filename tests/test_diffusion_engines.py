"""The diffusion engines (ACE-Step 1.5, AudioLDM 2, AudioLDM, Dance Diffusion, Stable Audio Open) through the
Predictor and the HTTP server, on tiny random pipelines: every task's rate / channels / length, seeds, repaint
keeping the rest of the song, progress logs, and the errors users see."""
import re

import numpy as np
import pytest

from conftest import make_tone, predict, read_audio
from lib.errors import UserError

FAST = dict(num_inference_steps=2, seed=3, normalization_strategy="peak")


@pytest.fixture(scope="module")
def tone48(audio_dir):
    """3 s stereo at ACE-Step's own rate, so decoding is lossless and samples can be compared exactly."""
    return make_tone(audio_dir / "tone48.wav", seconds=3.0, rate=48000, channels=2, freq=330.0)


@pytest.fixture(scope="module")
def tone16(audio_dir):
    return make_tone(audio_dir / "tone16.wav", seconds=1.5, rate=16000, channels=2, freq=220.0)


# (model, task, inputs, sample rate, channels, seconds); input "48" / "16" = the tone fixtures
TASKS = [
    ("ace-step-1.5-turbo", "text2music", dict(prompt="lofi", lyrics="[verse]\nla la", bpm=90, keyscale="A minor",
                                               timesignature=4, vocal_language="en", shift=2.0, duration=1.5),
     48000, 2, 1.5),
    ("ace-step-1.5-turbo", "cover", dict(prompt="jazz", input_audio="48", audio_cover_strength=0.5), 48000, 2, 3.0),
    ("ace-step-1.5-turbo", "repaint", dict(prompt="rock", input_audio="48", repainting_start=1.0,
                                            repainting_end=2.0), 48000, 2, 3.0),
    ("ace-step-1.5-base", "extract", dict(input_audio="48", track_name="drums", duration=2), 48000, 2, 2.0),
    ("ace-step-1.5-base", "lego", dict(prompt="blues", input_audio="48", track_name="guitar", guidance_scale=3,
                                        repainting_start=0.5), 48000, 2, 3.0),
    ("ace-step-1.5-base", "complete", dict(input_audio="48", track_name="bass"), 48000, 2, 3.0),
    ("ace-step-1.5-base", "text2music", dict(prompt="calm", duration=1.0, guidance_scale=5), 48000, 2, 1.0),
    ("audioldm2-music", "text2audio", dict(prompt="jazz", negative_prompt="noise", duration=1.2), 16000, 1, 1.2),
    ("audioldm2-music", "text2music", dict(prompt="jazz", duration=1.0), 16000, 1, 1.0),
    ("audioldm", "text2audio", dict(prompt="rain", negative_prompt="low quality", guidance_scale=2, duration=1.5),
     16000, 1, 1.5),
    ("dance-diffusion-maestro", "unconditional", dict(duration=1.3), 16000, 2, 1.3),
    ("dance-diffusion-maestro", "variation", dict(input_audio="16", strength=0.4), 16000, 2, 1.5),
    ("stable-audio-open", "text2music", dict(prompt="techno", negative_prompt="vocals", duration=1.7), 44100, 2, 1.7),
    ("stable-audio-open", "audio2audio", dict(prompt="techno", input_audio="48", strength=0.5, duration=2.0),
     44100, 2, 2.0),
]


def _inputs(kw, tone48, tone16):
    kw = dict(kw)
    if kw.get("input_audio") == "48":
        kw["input_audio"] = tone48
    elif kw.get("input_audio") == "16":
        kw["input_audio"] = tone16
    return kw


@pytest.mark.parametrize("model,task,kw,sr,channels,seconds", TASKS, ids=[f"{m}-{t}" for m, t, *_ in TASKS])
def test_every_task_gives_the_native_rate_channels_and_length(predictor, tone48, tone16, capsys, model, task, kw, sr,
                                                              channels, seconds):
    audio, got_sr = read_audio(predict(predictor, model_version=model, task=task, **FAST,
                                       **_inputs(kw, tone48, tone16)))
    assert got_sr == sr
    assert audio.shape == (channels, int(round(seconds * sr)))
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0.01
    out = capsys.readouterr().out
    assert f"task: {task}, model_version: {model}" in out
    assert re.search(r"denoising: step (\d+)/\1", out), "progress must reach the last step"


@pytest.mark.parametrize("model,kw", [
    ("ace-step-1.5-turbo", dict(prompt="pop", lyrics="[chorus]\nhey", duration=1.0)),
    ("audioldm2-music", dict(prompt="pop", duration=1.0)),
    ("dance-diffusion-maestro", dict(duration=1.0)),
    ("stable-audio-open", dict(prompt="pop", duration=1.0)),
])
def test_same_seed_same_audio_other_seed_other_audio(predictor, model, kw):
    base = dict(model_version=model, num_inference_steps=2, normalization_strategy="clip", **kw)
    a = read_audio(predict(predictor, seed=11, **base))[0]
    b = read_audio(predict(predictor, seed=11, **base))[0]
    c = read_audio(predict(predictor, seed=12, **base))[0]
    assert np.array_equal(a, b)
    assert not np.allclose(a, c, atol=1e-3)


def test_repaint_keeps_every_sample_outside_the_window(predictor, tone48):
    src = read_audio(tone48)[0]
    out, sr = read_audio(predict(predictor, model_version="ace-step-1.5-turbo", task="repaint", prompt="rock",
                                 input_audio=tone48, repainting_start=1.0, repainting_end=2.0, num_inference_steps=2,
                                 seed=5, normalization_strategy="clip"))
    assert out.shape == src.shape and sr == 48000
    s, e = 48000, 96000
    assert np.array_equal(out[:, :s], src[:, :s])  # bit-identical before the window
    assert np.array_equal(out[:, e:], src[:, e:])  # and after it
    inner = slice(s + 960, e - 960)  # past the 20 ms crossfades: new audio
    assert np.abs(out[:, inner] - src[:, inner]).mean() > 0.01


def test_repaint_to_the_end_with_minus_one_and_auto_task(predictor, tone48, capsys):
    src = read_audio(tone48)[0]
    out, _ = read_audio(predict(predictor, model_version="ace-step-1.5-turbo", prompt="rock", input_audio=tone48,
                                repainting_start=2.5, repainting_end=-1, num_inference_steps=2, seed=5,
                                normalization_strategy="clip"))
    assert "task: repaint" in capsys.readouterr().out  # auto: a window on input_audio = repaint
    assert np.array_equal(out[:, :120000], src[:, :120000])
    assert np.abs(out[:, 121000:] - src[:, 121000:]).mean() > 0.01


def test_repaint_splice_is_exact_in_the_engine():
    from lib.diffusion import splice

    rng = np.random.default_rng(0)
    orig, gen = rng.standard_normal((2, 1000)).astype(np.float32), rng.standard_normal((2, 1000)).astype(np.float32)
    out = splice(orig, gen, 300, 700, 50)
    assert np.array_equal(out[:, :300], orig[:, :300]) and np.array_equal(out[:, 700:], orig[:, 700:])
    assert np.array_equal(out[:, 350:650], gen[:, 350:650])
    assert np.all(np.abs(out[:, 300:350]) <= np.maximum(np.abs(orig[:, 300:350]), np.abs(gen[:, 300:350])) + 1e-6)


@pytest.mark.parametrize("model,kw,task", [
    ("ace-step-1.5-turbo", dict(input_audio="48"), "cover"),
    ("audioldm", dict(prompt="rain"), "text2audio"),
    ("dance-diffusion-maestro", dict(input_audio="16"), "variation"),
    ("dance-diffusion-maestro", dict(), "unconditional"),
    ("stable-audio-open", dict(input_audio="48", duration=1.0), "audio2audio"),
])
def test_auto_task_is_the_engines_natural_one(predictor, tone48, tone16, capsys, model, kw, task):
    kw = _inputs(kw, tone48, tone16)
    kw.setdefault("duration", 1.0) if "input_audio" not in kw else None
    predict(predictor, model_version=model, num_inference_steps=1, seed=1, **kw)
    assert f"task: {task}" in capsys.readouterr().out


def test_explicit_task_with_auto_model_picks_a_model_that_serves_it(predictor, capsys):
    predict(predictor, task="text2audio", prompt="birds", duration=1.0, num_inference_steps=1, seed=1)
    assert re.search(r"task: text2audio, model_version: audioldm2-music", capsys.readouterr().out)


def test_variation_strength_moves_away_from_the_input(predictor, tone16):
    src = read_audio(tone16)[0]
    near = read_audio(predict(predictor, model_version="dance-diffusion-maestro", input_audio=tone16, strength=0.05,
                              num_inference_steps=20, seed=2, normalization_strategy="clip"))[0]
    far = read_audio(predict(predictor, model_version="dance-diffusion-maestro", input_audio=tone16, strength=1.0,
                             num_inference_steps=20, seed=2, normalization_strategy="clip"))[0]
    assert np.abs(near - src).mean() < np.abs(far - src).mean()


@pytest.mark.parametrize("kw,field,words", [
    (dict(model_version="audioldm", prompt="x", lyrics="[verse] hi"), "lyrics", "used by ACE-Step 1.5"),
    (dict(model_version="ace-step-1.5-turbo", prompt="x", strength=0.3), "strength", "Dance Diffusion (variation)"),
    (dict(model_version="ace-step-1.5-turbo", prompt="x", guidance_scale=5), "guidance_scale", "ace-step-1.5-base"),
    (dict(model_version="ace-step-1.5-turbo", prompt="x", top_k=10), "top_k", "MusicGen"),
    (dict(model_version="dance-diffusion-maestro", prompt="x"), "prompt", "ignores this input"),
    (dict(model_version="small", prompt="x", negative_prompt="noise"), "negative_prompt", "AudioLDM"),
    (dict(model_version="ace-step-1.5-turbo", prompt="x", repainting_start=1.0, task="text2music"),
     "repainting_start", "ACE-Step 1.5 (repaint/lego)"),
    (dict(model_version="ace-step-1.5-turbo", task="extract", track_name="drums"), "task", "ace-step-1.5-base"),
    (dict(model_version="stable-audio-open", prompt="x", duration=60), "duration", "47.55"),
    (dict(model_version="audioldm2-music", prompt="x", duration=45), "duration", "30"),
    (dict(model_version="ace-step-1.5-turbo", prompt="x", keyscale="H major"), "keyscale", "C major"),
    (dict(model_version="ace-step-1.5-turbo", prompt="x", timesignature=5), "timesignature", "6/8"),
    (dict(model_version="ace-step-1.5-base", task="extract", track_name="kazoo"), "track_name", "vocals"),
    (dict(model_version="ace-step-1.5-turbo", task="cover", prompt="x"), "input_audio", "needs an input_audio"),
    (dict(task="unconditional", model_version="small"), "task", "dance-diffusion-maestro"),
])
def test_ignored_or_invalid_inputs_name_the_input_and_the_engine(predictor, kw, field, words):
    with pytest.raises(UserError) as e:
        predict(predictor, **kw)
    assert e.value.field == field, e.value
    assert words in str(e.value)


@pytest.mark.parametrize("kw,field,words", [
    (dict(repainting_start=3.5), "repainting_start", "past the end"),
    (dict(repainting_start=1.0, repainting_end=4.0), "repainting_end", "past the end"),
    (dict(repainting_start=2.0, repainting_end=1.5), "repainting_end", "must be after repainting_start"),
    (dict(repainting_start=1.0, repainting_end=1.01), "repainting_end", "at least"),
    (dict(duration=5), "duration", "only 3.00 s long"),
])
def test_out_of_range_repaint_windows_fail_clearly(predictor, tone48, kw, field, words):
    with pytest.raises(UserError) as e:
        predict(predictor, model_version="ace-step-1.5-turbo", task="repaint", prompt="x", input_audio=tone48,
                num_inference_steps=1, **kw)
    assert e.value.field == field, e.value
    assert words in str(e.value)


def test_defaults_of_ignored_inputs_are_fine_on_musicgen(predictor):
    """MusicGen requests are untouched by the new inputs at their defaults (-1 = end is a default too)."""
    audio, sr = read_audio(predict(predictor, prompt="beat", duration=1.0, model_version="small", seed=1,
                                   repainting_end=-1))
    assert sr == 32000 and audio.shape == (1, 32000)


def test_dance_diffusion_old_config_needs_the_time_embedding_quirk(tiny_weights):
    """The tiny maestro config has no time_embedding_dim (as the real one): plain from_pretrained breaks, ours loads."""
    import json

    import torch
    from diffusers import UNet1DModel

    from lib import catalog
    from lib.diffusion import DanceDiffusionEngine

    folder = tiny_weights / "dance-diffusion-maestro-150k"
    assert "time_embedding_dim" not in json.loads((folder / "unet" / "config.json").read_text())
    with pytest.raises(Exception):
        UNet1DModel.from_pretrained(folder / "unet")
    eng = DanceDiffusionEngine(catalog.MODELS["dance-diffusion-maestro"], folder, torch.device("cpu"), torch.float32)
    assert eng.sample_rate == 16000 and eng.channels == 2


# -- through the real HTTP server -------------------------------------------------------------------------

@pytest.fixture
def ready(server):
    server.wait_ready(60)
    yield server
    server.wait_ready(60)


def _decode(body):
    import io

    import soundfile

    from lib.local_server import data_uri_to_bytes

    data, sr = soundfile.read(io.BytesIO(data_uri_to_bytes(body["output"])), always_2d=True, dtype="float32")
    return data.T, sr


def test_http_ace_step_repaint_and_stable_audio(ready, tone48):
    from lib.local_server import file_to_data_uri

    status, body = ready.predict({"model_version": "ace-step-1.5-turbo", "task": "repaint", "prompt": "rock",
                                  "input_audio": file_to_data_uri(tone48, "audio/wav"), "repainting_start": 1.0,
                                  "repainting_end": 2.0, "num_inference_steps": 2, "seed": 4,
                                  "normalization_strategy": "clip", "output_format": "flac"})
    assert status == 200 and body["status"] == "succeeded", body
    audio, sr = _decode(body)
    src = read_audio(tone48)[0]
    assert sr == 48000 and audio.shape == src.shape
    assert np.array_equal(audio[:, :48000], src[:, :48000]) and np.array_equal(audio[:, 96000:], src[:, 96000:])
    assert "denoising: step 2/2" in body["logs"]
    ready.wait_ready(60)
    status, body = ready.predict({"model_version": "stable-audio-open", "prompt": "techno", "duration": 1.5,
                                  "num_inference_steps": 2, "seed": 1})
    assert status == 200 and body["status"] == "succeeded", body
    audio, sr = _decode(body)
    assert sr == 44100 and audio.shape == (2, 66150)


@pytest.mark.parametrize("inputs,words", [
    ({"model_version": "ace-step-1.5-turbo", "prompt": "x", "bpm": 500}, "bpm"),
    ({"model_version": "dance-diffusion-maestro", "strength": 1.5}, "strength"),
    ({"task": "karaoke"}, "task"),
])
def test_http_schema_rejects_out_of_range_new_inputs(ready, inputs, words):
    status, body = ready.predict(inputs)
    assert status == 422, body
    assert words in str(body)


def test_http_ignored_input_fails_with_the_engine_named(ready):
    status, body = ready.predict({"model_version": "audioldm", "prompt": "rain", "lyrics": "[verse] hi",
                                  "duration": 1.0, "num_inference_steps": 1})
    assert status == 200 and body["status"] == "failed"
    assert "lyrics" in body["error"] and "ACE-Step 1.5" in body["error"]


# -- the CUDA speed-ups (lib.diffusion: DenoiserGraphs, unet1d_rewrites), their logic checked on CPU ----------------

def _tiny_unet1d():
    from lib.tiny_diffusion import build_dance_diffusion

    return build_dance_diffusion(seed=1).unet.eval()


def _instance_forwards(module):
    return [m for m in module.modules() if "forward" in m.__dict__]


def test_unet1d_rewrites_give_the_same_output_and_are_undone():
    import torch

    from lib.diffusion import unet1d_rewrites

    unet = _tiny_unet1d()
    x, t = torch.randn(1, 2, 4096, generator=torch.Generator().manual_seed(0)), torch.tensor(0.3)
    with torch.inference_mode():
        plain = unet(x, t).sample
        with unet1d_rewrites(unet) as changed:
            rewritten = unet(x, t).sample
            assert len(_instance_forwards(unet)) == changed > 0
        assert not _instance_forwards(unet)
        assert torch.equal(unet(x, t).sample, plain)
        with pytest.raises(RuntimeError), unet1d_rewrites(unet):
            raise RuntimeError("request failed")
    assert not _instance_forwards(unet)  # undone on errors too
    assert torch.allclose(rewritten, plain, rtol=0, atol=1e-5 * float(plain.abs().max()))
    assert not torch.equal(rewritten, plain)  # other kernels really ran (fp32 rounding differs)


class _CpuGraphs:
    """DenoiserGraphs' three CUDA parts replaced for CPU: a "graph" re-runs the captured call on the captured input
    tensors and writes into the captured outputs, as a replay does."""

    def make(self, module, fail=None, **kw):
        from lib.cuda_graphs import DenoiserGraphs, _clone_tensors
        import torch.utils._pytree as pytree

        class Replay:
            def __init__(self, call, out):
                self.call, self.out = call, out

            def replay(self):
                for old, new in zip(pytree.tree_leaves(self.out), pytree.tree_leaves(self.call())):
                    old.copy_(new)

        class CpuGraphs(DenoiserGraphs):
            _usable = staticmethod(lambda x: True)
            _warm_up = staticmethod(lambda call: _clone_tensors(call()))

            @staticmethod
            def _record(call):
                if fail is not None:
                    raise fail
                out = call()
                return Replay(call, out), out

        return CpuGraphs(module, **kw)


def test_denoiser_graphs_replay_gives_each_steps_own_answer_and_is_freed_on_exit():
    import torch

    unet = _tiny_unet1d()
    gen = torch.Generator().manual_seed(0)
    steps = [(torch.randn(1, 2, 2048, generator=gen), t) for t in torch.linspace(1, 0.1, 5)]
    with torch.inference_mode():
        eager = [unet(x, t).sample for x, t in steps]
        graphs = _CpuGraphs().make(unet)
        with graphs.installed():
            assert _instance_forwards(unet) == [unet]
            got = [unet(x, t).sample for x, t in steps]
            assert all(torch.equal(a, b) for a, b in zip(eager, got))
            got[1].add_(1.0)  # a copy: neither the captured outputs nor the next replay see it
            assert torch.equal(unet(*steps[1]).sample, eager[1])
        assert (graphs.captures, graphs.replays, graphs.disabled) == (1, 5, None)
        assert graphs.summary() == "cuda graphs: 1 captured, 5 replays"
    assert not _instance_forwards(unet) and not graphs.graphs


def test_denoiser_graphs_signatures_eviction_and_fallbacks():
    import torch

    unet = _tiny_unet1d()
    t = torch.tensor(0.5)
    with torch.inference_mode():
        graphs = _CpuGraphs().make(unet, max_graphs=2, max_captures=3)
        with graphs.installed():
            for n in (1024, 2048, 1024, 4096):  # a new length is a new graph; the least recently used goes
                unet(torch.zeros(1, 2, n), t)
            assert graphs.captures == 3 and graphs.replays == 1
            assert [k[1][0][0] for k in graphs.graphs] == [(1, 2, 1024), (1, 2, 4096)]
            out = unet(torch.ones(1, 2, 8192), t).sample  # past max_captures: eager for the rest of the request
            assert graphs.disabled and "captures" in graphs.disabled
            assert torch.equal(out, unet.__class__.forward(unet, torch.ones(1, 2, 8192), t).sample)
            assert graphs._key([[1, 2]], None) is None  # an unhashable argument: not keyed, so eager
        failing = _CpuGraphs().make(unet, fail=RuntimeError("operation not permitted when stream is capturing"))
        with failing.installed():
            x = torch.randn(1, 2, 1024, generator=torch.Generator().manual_seed(1))
            first, second = unet(x, t).sample, unet(x, t).sample
        assert failing.disabled.startswith("capture failed") and failing.captures == 1 and not failing.graphs
        assert torch.equal(first, second)  # the eager answer both times
        oom = _CpuGraphs().make(unet, fail=torch.cuda.OutOfMemoryError("CUDA out of memory"))
        with pytest.raises(torch.cuda.OutOfMemoryError), oom.installed():
            unet(torch.zeros(1, 2, 1024), t)  # an OOM while capturing is the user's OOM, not a fallback
        assert not oom.graphs and oom.disabled is None
    assert not _instance_forwards(unet)


def test_cpu_engines_use_neither_graphs_nor_rewrites(tiny_weights):
    """The CPU path is diffusers' own: no forward override anywhere in the UNet while a request runs."""
    import torch

    from lib import catalog
    from lib.diffusion import DanceDiffusionEngine
    from lib.request import Request

    eng = DanceDiffusionEngine(catalog.MODELS["dance-diffusion-maestro"], tiny_weights / "dance-diffusion-maestro-150k",
                               torch.device("cpu"), torch.float32)
    seen = []
    hook = eng.unet.register_forward_pre_hook(lambda m, a: seen.append(len(_instance_forwards(eng.unet))))
    req = Request(duration=1.0, num_inference_steps=2, model_version="dance-diffusion-maestro")
    plain = eng.run(req, "unconditional", 4, lambda m: None)
    assert seen == [0, 0]
    eng.fast_devices = ("cpu",)  # what bench/diffusion.py's CPU dry run does: the rewrites, here on CPU
    rewritten = eng.run(req, "unconditional", 4, lambda m: None)
    hook.remove()
    assert seen[2:] and all(n > 0 for n in seen[2:]) and not _instance_forwards(eng.unet)
    assert plain.shape == rewritten.shape and np.abs(plain - rewritten).max() < 1e-4


def test_ace_step_dit_blocks_get_row_major_tokens_and_the_same_latents():
    """diffusers' ACE-Step DiT hands its blocks a transposed view (unaligned GEMMs on the GPU); the engine's
    pre-hook makes it row-major before the first block, which must not change the result."""
    import torch

    from lib.diffusion import _row_major_hidden_states
    from lib.tiny_diffusion import build_ace_step

    pipe = build_ace_step(turbo=True, seed=0)
    pipe.set_progress_bar_config(disable=True)
    layer0, seen = pipe.transformer.layers[0], []
    spy = layer0.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["hidden_states"].is_contiguous()),
                                           with_kwargs=True)

    def latents():
        return pipe(prompt="pads", lyrics="", audio_duration=2.0, num_inference_steps=2, output_type="latent",
                    return_dict=False, generator=torch.Generator().manual_seed(0))[0]

    with torch.inference_mode():
        plain = latents()
        fix = layer0.register_forward_pre_hook(_row_major_hidden_states, with_kwargs=True, prepend=True)
        fixed = latents()
    fix.remove(), spy.remove()
    assert seen == [False, False, True, True]
    assert torch.allclose(fixed, plain, rtol=0, atol=1e-5 * float(plain.abs().max()))


def test_stable_audio_rotary_embedding_is_copied_once_per_pair():
    import torch

    from lib.diffusion import _RotaryOnDevice

    hook = _RotaryOnDevice(torch.device("cpu"))
    pair = (torch.randn(8, 4), torch.randn(8, 4))
    _, first = hook(None, ("x",), {"rotary_embedding": pair, "return_dict": False})
    _, again = hook(None, ("x",), {"rotary_embedding": pair, "return_dict": False})
    assert again["rotary_embedding"] is first["rotary_embedding"]  # the same device copy every step
    assert all(torch.equal(a, b) for a, b in zip(first["rotary_embedding"], pair)) and not again["return_dict"]
    other = (torch.randn(8, 4), torch.randn(8, 4))
    _, new = hook(None, (), {"rotary_embedding": other})
    assert torch.equal(new["rotary_embedding"][0], other[0]) and len(hook.copies) == 1
    assert hook(None, (), {"rotary_embedding": None}) is None  # nothing to move: the call goes on unchanged


@pytest.mark.parametrize("turbo", [True, False], ids=["turbo", "base-cfg"])
def test_ace_step_fused_dit_blocks_give_the_stock_latents(turbo, monkeypatch):
    """lib.ace_step_dit's block forward (packed projections, fused norms / rotary / residuals; here with the torch
    expressions its kernels replace) gives the stock latents, with and without CFG (batch 2); packing makes the
    weights views of one buffer without changing what the stock forward computes; the stock forward is back after."""
    import torch

    from lib import ace_step_dit
    from lib.tiny_diffusion import build_ace_step

    pipe = build_ace_step(turbo=turbo, seed=0)
    pipe.set_progress_bar_config(disable=True)
    dit = pipe.transformer

    def latents():
        return pipe(prompt="pads", lyrics="[verse]\nla la", audio_duration=2.0, num_inference_steps=2,
                    output_type="latent", return_dict=False, generator=torch.Generator().manual_seed(0))[0]

    with torch.inference_mode():
        stock = latents()
        assert ace_step_dit.pack_weights(dit) == 3 * len(dit.layers) and ace_step_dit.pack_weights(dit) == 0
        attn = dit.layers[0].self_attn
        qkv = ace_step_dit.packed_weight((attn.to_q, attn.to_k, attn.to_v))
        assert qkv.data_ptr() == attn.to_q.weight.data_ptr() and torch.equal(qkv[-attn.to_v.out_features:],
                                                                             attn.to_v.weight)
        assert torch.equal(latents(), stock)  # packed: the same values in the same Linears
        calls = []
        fused_op = ace_step_dit.head_rms_rope
        monkeypatch.setattr(ace_step_dit, "head_rms_rope", lambda *a: calls.append(1) or fused_op(*a))
        with ace_step_dit.fused_blocks(dit) as n:
            fused = latents()
    # the fused forward ran: 4 per-head norms (q, k; cross q, k) per block per call, 2 steps (x2 with CFG)
    assert n == len(dit.layers) and len(calls) == 4 * n * 2
    assert all("forward" not in b.__dict__ for b in dit.layers)
    assert fused.shape == stock.shape and not torch.equal(fused, torch.zeros_like(fused))
    assert torch.allclose(fused, stock, rtol=0, atol=1e-5 * float(stock.abs().max()))


@pytest.mark.parametrize("name", ["ace-step-1.5-turbo", "audioldm2-music", "audioldm", "dance-diffusion-maestro",
                                  "stable-audio-open"])
def test_every_diffusion_engine_warms_up_with_a_short_request(tiny_weights, name):
    """The service runs each diffusion engine's warm_up() in setup on CUDA (so that the first real request pays no
    kernel compilation): a 1 s, 2-step request of the engine's own task that must go through for every engine."""
    import torch

    from lib import catalog
    from lib.service import engine_class

    spec = catalog.MODELS[name]
    engine = engine_class(spec.engine)(spec, tiny_weights / spec.folder, torch.device("cpu"), torch.float32)
    seen = []
    run = engine.run
    engine.run = lambda req, task, seed, log: seen.append((task, req.duration, req.num_inference_steps)) or \
        run(req, task, seed, log)
    assert engine.warm_up() is None
    assert seen == [(engine.duration_tasks()[0], 1.0, 2)]
