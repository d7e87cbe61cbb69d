"""MusicGen through the Predictor on tiny random weights: every task, input and output the user relies on."""
import re

import numpy as np
import pytest

from conftest import make_tone, predict, read_audio
from lib.audio import loudness_lufs, mp3_bitrate_kbps
from lib.errors import UserError

SR = 32000


def test_text2music_mono_has_requested_length_rate_and_channels(predictor):
    audio, sr = read_audio(predict(predictor, prompt="lofi beat", duration=2.5, model_version="small", seed=1))
    assert sr == SR
    assert audio.shape == (1, int(2.5 * SR))
    assert np.abs(audio).max() > 0.01  # not silence


def test_stereo_model_gives_two_different_channels(predictor):
    audio, sr = read_audio(predict(predictor, prompt="jazz piano", duration=2, model_version="stereo-small", seed=1))
    assert (sr, audio.shape) == (SR, (2, 2 * SR))
    assert not np.allclose(audio[0], audio[1])


def test_fractional_duration_is_exact_to_the_sample(predictor):
    audio, _ = read_audio(predict(predictor, prompt="beat", duration=1.37, model_version="small", seed=3))
    assert audio.shape[1] == round(1.37 * SR)


def test_same_seed_same_audio_and_zero_is_a_real_seed(predictor):
    a = read_audio(predict(predictor, prompt="rock", duration=1.5, model_version="small", seed=0))[0]
    b = read_audio(predict(predictor, prompt="rock", duration=1.5, model_version="small", seed=0))[0]
    c = read_audio(predict(predictor, prompt="rock", duration=1.5, model_version="small", seed=1))[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_random_seed_is_logged_and_reproduces(predictor, capsys):
    a = read_audio(predict(predictor, prompt="calm", duration=1.5, model_version="small", seed=-1))[0]
    seed = int(re.search(r"seed: (\d+)", capsys.readouterr().out).group(1))
    b = read_audio(predict(predictor, prompt="calm", duration=1.5, model_version="small", seed=seed))[0]
    np.testing.assert_array_equal(a, b)


def test_prompt_changes_the_music(predictor):
    a = read_audio(predict(predictor, prompt="rock drums", duration=1.5, model_version="small", seed=5))[0]
    b = read_audio(predict(predictor, prompt="calm piano", duration=1.5, model_version="small", seed=5))[0]
    assert not np.array_equal(a, b)


def test_empty_prompt_is_unconditional_generation(predictor):
    audio, _ = read_audio(predict(predictor, prompt=None, duration=1.5, model_version="small", seed=2))
    assert audio.shape == (1, int(1.5 * SR))


def test_greedy_temperature_zero_ignores_the_seed(predictor):
    a = read_audio(predict(predictor, prompt="jazz", duration=1.5, model_version="small", temperature=0, seed=1))[0]
    b = read_audio(predict(predictor, prompt="jazz", duration=1.5, model_version="small", temperature=0, seed=2))[0]
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=0.5), dict(classifier_free_guidance=1),
                                dict(classifier_free_guidance=2.5), dict(temperature=0.7, top_k=10)])
def test_sampling_settings_are_accepted_and_change_the_output(predictor, kw):
    base = read_audio(predict(predictor, prompt="house", duration=1.5, model_version="small", seed=9))[0]
    out = read_audio(predict(predictor, prompt="house", duration=1.5, model_version="small", seed=9, **kw))[0]
    assert out.shape == base.shape
    assert not np.array_equal(out, base)


def test_longer_than_30s_uses_windowed_extension(predictor, capsys):
    audio, _ = read_audio(predict(predictor, prompt="ambient", duration=33, model_version="small", seed=4,
                                  normalization_strategy="clip"))
    assert audio.shape == (1, 33 * SR)
    assert np.abs(audio[:, -SR:]).max() > 0.01  # the extension window produced audio, not padding
    assert "1650/1650 frames" in capsys.readouterr().out


def test_melody_follows_the_input_melody(predictor, audio_dir):
    low = make_tone(audio_dir / "low.wav", seconds=3, freq=220.0)
    high = make_tone(audio_dir / "high.wav", seconds=3, freq=370.0)  # a different pitch class
    a = read_audio(predict(predictor, prompt="jazz", input_audio=low, duration=2, model_version="melody", seed=7))[0]
    b = read_audio(predict(predictor, prompt="jazz", input_audio=high, duration=2, model_version="melody", seed=7))[0]
    a2 = read_audio(predict(predictor, prompt="jazz", input_audio=low, duration=2, model_version="melody", seed=7))[0]
    assert a.shape == (1, 2 * SR)
    np.testing.assert_array_equal(a, a2)
    assert not np.array_equal(a, b), "the melody must condition the output"


def test_melody_shorter_than_the_output_is_looped_and_stereo_melody_works(predictor, audio_dir):
    short = make_tone(audio_dir / "short.mp3", seconds=1, freq=300.0)
    audio, sr = read_audio(predict(predictor, prompt="song", input_audio=short, duration=3,
                                   model_version="stereo-melody", seed=1))
    assert (sr, audio.shape) == (SR, (2, 3 * SR))


def test_auto_picks_a_melody_model_for_input_audio_without_continuation(predictor, tone_wav, capsys):
    predict(predictor, prompt="x", input_audio=tone_wav, duration=1.5, seed=1)
    out = capsys.readouterr().out
    assert "task: melody" in out and re.search(r"model_version: (stereo-)?melody", out)


def test_continuation_output_holds_the_window_then_new_music(predictor, tone_wav, capsys):
    from lib import audio as audio_io

    out, _ = read_audio(predict(predictor, prompt="jazz", input_audio=tone_wav, continuation=True,
                                continuation_start=0.5, continuation_end=2.0, duration=3.5,
                                model_version="small", seed=3, normalization_strategy="clip"))
    assert out.shape == (1, int(3.5 * SR))
    assert "task: continuation" in capsys.readouterr().out
    # the first 1.5 s is the window, as EnCodec reconstructs it
    engine = predictor.service.engines["small"]
    window = audio_io.load_audio(tone_wav, SR, 1)[:, int(0.5 * SR):int(2.0 * SR)]
    recon = engine.decode_codes(engine.encode_audio(window))
    n = int(1.4 * SR)  # the convolutions look ~ms ahead across the window's end
    corr = np.corrcoef(out[0, :n], recon[0, :n])[0, 1]
    assert corr > 0.99, corr
    assert not np.allclose(out[0, int(1.6 * SR):], 0)


def test_continuation_window_to_end_of_clip_with_minus_one(predictor, audio_dir):
    clip = make_tone(audio_dir / "clip.flac", seconds=1.2)
    out, _ = read_audio(predict(predictor, prompt="x", input_audio=clip, continuation=True, continuation_end=-1,
                                duration=2, model_version="stereo-small", seed=1))
    assert out.shape == (2, 2 * SR)


def test_continuation_past_30s(predictor, audio_dir):
    clip = make_tone(audio_dir / "clip2.ogg", seconds=2)
    out, _ = read_audio(predict(predictor, prompt="x", input_audio=clip, continuation=True, duration=31,
                                model_version="small", seed=1))
    assert out.shape == (1, 31 * SR)


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3"])
def test_output_formats_decode_back(predictor, fmt):
    import soundfile

    path = predict(predictor, prompt="beat", duration=2, model_version="stereo-small", seed=1, output_format=fmt)
    assert path.suffix == f".{fmt}"
    info = soundfile.info(str(path))
    assert (info.samplerate, info.channels) == (SR, 2)
    assert abs(info.frames / SR - 2.0) < 0.06  # mp3 frames round the length a little
    if fmt == "wav":
        assert info.subtype == "PCM_16"
    if fmt == "mp3":
        assert mp3_bitrate_kbps(path) == 320


def test_outputs_never_share_a_path(predictor):
    paths = {predict(predictor, prompt="a", duration=1, model_version="small", seed=1) for _ in range(3)}
    assert len(paths) == 3 and all(p.exists() for p in paths)


@pytest.mark.parametrize("strategy,check", [
    ("loudness", lambda a: abs(loudness_lufs(a, SR) - (-14.0)) < 0.5),
    ("peak", lambda a: abs(np.abs(a).max() - 10 ** (-1 / 20)) < 0.01),
    ("rms", lambda a: abs(20 * np.log10(np.sqrt(np.mean(a ** 2))) - (-18.0)) < 0.6),
    ("clip", lambda a: np.abs(a).max() <= 1.0),
])
def test_normalization_strategies_measured(predictor, strategy, check):
    audio, _ = read_audio(predict(predictor, prompt="techno", duration=3, model_version="small", seed=11,
                                  normalization_strategy=strategy, output_format="flac"))
    assert np.isfinite(audio).all()
    assert check(audio), strategy


# -- validation: each bad request names its input and says what to do ------------------------------------

@pytest.mark.parametrize("kw,field,words", [
    (dict(duration=0.5), "duration", "at least"),
    (dict(duration=301), "duration", "at most"),
    (dict(top_p=1.5), "top_p", "at most"),
    (dict(temperature=float("nan")), "temperature", "finite"),
    (dict(output_format="ogg"), "output_format", "one of"),
    (dict(model_version="large"), "model_version", "script/download-weights large"),
    (dict(model_version="nope"), "model_version", "one of"),
    (dict(continuation=True), "input_audio", "needs an input_audio"),
    (dict(continuation_start=2), "continuation_start", "continuation=true"),
    (dict(task="melody", model_version="small"), "input_audio", "needs an input_audio"),
])
def test_invalid_requests_name_the_input(predictor, kw, field, words):
    with pytest.raises(UserError) as e:
        predict(predictor, prompt="x", duration=kw.pop("duration", 2), **kw)
    assert e.value.field == field
    assert words in str(e.value)


@pytest.mark.parametrize("kw,field,words", [
    (dict(model_version="small"), "model_version", "melody model"),
    (dict(task="text2music"), "input_audio", "text2music ignores input_audio"),
    (dict(continuation=True, continuation_start=1.0, continuation_end=0.5), "continuation_end", "after"),
    (dict(continuation=True, continuation_end=3.0, duration=2), "continuation_end", "shorter than 2"),
    (dict(continuation=True, continuation_start=10.0), "continuation_start", "past the end"),
    (dict(continuation=True, continuation_start=0, continuation_end=9.0, duration=20), "continuation_end",
     "past the end"),
])
def test_invalid_audio_requests_name_the_input(predictor, tone_wav, kw, field, words):
    kw.setdefault("duration", 3)
    with pytest.raises(UserError) as e:
        predict(predictor, prompt="x", input_audio=tone_wav, **kw)
    assert e.value.field == field
    assert words in str(e.value)


@pytest.mark.parametrize("content", [b"", b"not audio at all, just text\n" * 10, bytes(range(256)) * 40])
def test_bad_input_audio_files_fail_clearly(predictor, tmp_path, content):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(content)
    with pytest.raises(UserError) as e:
        predict(predictor, prompt="x", input_audio=bad, duration=2, continuation=True, model_version="small")
    assert e.value.field == "input_audio"
