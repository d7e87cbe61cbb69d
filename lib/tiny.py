"""Tiny RANDOM models of every architecture we serve, written in the Hugging Face layout.

They let every test run on a 2-core CPU through the real loading code (`from_pretrained(local_dir)`),
since real checkpoints cannot be downloaded on CI. The weights are random: the audio is noise, but
its shape, rate, channel count, length and determinism are exactly what the real models give.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

# A small Unigram vocabulary built from a list: no sentencepiece model file needed.
_WORDS = ["lofi", "beat", "jazz", "rock", "piano", "drums", "calm", "bass", "guitar", "synth", "ambient",
          "techno", "house", "with", "and", "slow", "fast", "happy", "sad", "song", "music", "electronic"]


def _t5_tokenizer():
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    vocab += [("▁" + w, -1.0) for w in _WORDS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _musicgen_configs(stereo: bool, melody: bool):
    from transformers import EncodecConfig, T5Config

    codebook_size = 64
    t5 = T5Config(vocab_size=len(_t5_tokenizer()), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    # 32 kHz, hop 640 -> 50 frames/s and 4 codebooks, as the real MusicGen EnCodec.
    encodec = EncodecConfig(sampling_rate=32000, audio_channels=1, target_bandwidths=[1.2],
                            upsampling_ratios=[8, 5, 4, 4], num_filters=4, hidden_size=16,
                            codebook_size=codebook_size, codebook_dim=16, num_lstm_layers=1,
                            use_causal_conv=False, normalize=False, chunk_length_s=None, overlap=None)
    decoder = dict(vocab_size=codebook_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   ffn_dim=128, num_codebooks=8 if stereo else 4, audio_channels=2 if stereo else 1,
                   max_position_embeddings=2048, pad_token_id=codebook_size, bos_token_id=codebook_size,
                   decoder_start_token_id=codebook_size)
    return t5, encodec, decoder, codebook_size


def build_musicgen(stereo: bool = False, melody: bool = False, seed: int = 0):
    """A tiny random MusicGen (mono/stereo, text-only/melody) with the real classes."""
    from transformers import (MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration,
                              MusicgenMelodyConfig, MusicgenMelodyDecoderConfig,
                              MusicgenMelodyForConditionalGeneration)

    t5, encodec, dec, codebook_size = _musicgen_configs(stereo, melody)
    torch.manual_seed(seed)
    if melody:
        config = MusicgenMelodyConfig(text_encoder=t5.to_dict(), audio_encoder=encodec.to_dict(),
                                      decoder=MusicgenMelodyDecoderConfig(**dec).to_dict(),
                                      num_chroma=12, chroma_length=235)
        model = MusicgenMelodyForConditionalGeneration(config)
    else:
        config = MusicgenConfig(text_encoder=t5.to_dict(), audio_encoder=encodec.to_dict(),
                                decoder=MusicgenDecoderConfig(**dec).to_dict())
        model = MusicgenForConditionalGeneration(config)
    _rescale_decoder(model)
    _center_codec_output(model.audio_encoder, codebook_size)
    gen = model.generation_config
    gen.decoder_start_token_id = codebook_size
    gen.pad_token_id = codebook_size
    gen.bos_token_id = codebook_size
    gen.do_sample = True
    gen.guidance_scale = 3.0
    gen.top_k = 50
    gen.max_length = 1500
    return model.eval()


def _rescale_decoder(model) -> None:
    """HF initializes every weight with std 0.02: in a 64-wide model the token embeddings and the text /
    chroma projections then vanish next to the positional embedding, and every output is the same whatever
    the prompt, melody or seed. Variance-preserving weights make each input matter, as in a trained model;
    lm heads at ~3 nats of spread keep sampling settings (top_k, top_p, temperature) visible."""
    g = torch.Generator().manual_seed(4321)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.startswith(("text_encoder", "audio_encoder")):
                continue
            if isinstance(module, torch.nn.Embedding):
                module.weight.normal_(0.0, 1.0, generator=g)
            elif isinstance(module, torch.nn.Linear):
                std = (3.0 if "lm_heads" in name else 1.0) / module.in_features ** 0.5
                module.weight.normal_(0.0, std, generator=g)


def _center_codec_output(encodec, codebook_size: int) -> None:
    """A random EnCodec decoder outputs mostly a DC offset (its last conv sums positive ELU outputs), which
    normalization then turns into a clipped constant. Re-center it (final conv bias) so tiny models give
    zero-mean, audio-like noise and loudness / peak / rms tests measure something real."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():  # codebooks are buffers that HF leaves at zero: every code would decode the same
        for layer in encodec.quantizer.layers:
            layer.codebook.embed.normal_(0.0, 1.0, generator=g)
            layer.codebook.embed_avg.copy_(layer.codebook.embed)
    codes = torch.randint(0, codebook_size, (1, 1, encodec.config.num_quantizers, 200), generator=g)
    with torch.no_grad():
        out = encodec.decode(codes, audio_scales=[None]).audio_values
        encodec.decoder.layers[-1].conv.bias.sub_(out.mean())


MUSICGEN_TINY = {
    # name in weights/ -> (stereo, melody); the same names the download script uses for the real ones
    "musicgen-small": (False, False),
    "musicgen-stereo-small": (True, False),
    "musicgen-melody": (False, True),
    "musicgen-stereo-melody": (True, True),
}


def write_musicgen(directory: Path, stereo: bool, melody: bool, seed: int = 0) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = build_musicgen(stereo=stereo, melody=melody, seed=seed)
    model.save_pretrained(directory, safe_serialization=True)
    _t5_tokenizer().save_pretrained(directory)
    # The real repos ship a preprocessor config; ours records the same fields we read.
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "feature_extractor_type": "MusicgenMelodyFeatureExtractor" if melody else "EncodecFeatureExtractor",
        "sampling_rate": 32000, "feature_size": 2 if stereo else 1,
    }, indent=2))
    (directory / "TINY_RANDOM_WEIGHTS").write_text("Random weights for tests: the audio is noise.\n")
    return directory


def write_all(root: Path) -> list[Path]:
    """Every tiny model, each in weights/<name>/ layout. Returns the folders written."""
    root = Path(root)
    written = []
    for i, (name, (stereo, melody)) in enumerate(MUSICGEN_TINY.items()):
        written.append(write_musicgen(root / name, stereo, melody, seed=i))
    from lib import tiny_mbd

    written.append(tiny_mbd.write_mbd(root / "multiband-diffusion"))
    from lib import tiny_diffusion

    written += tiny_diffusion.write_all(root)
    from lib import tiny_image2music  # image2music captioner + prompt writer

    written += tiny_image2music.write_all(root)
    return written
