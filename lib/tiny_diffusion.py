"""Tiny RANDOM diffusion pipelines (ACE-Step 1.5 turbo/base, AudioLDM 2, AudioLDM, Dance Diffusion, Stable
Audio Open) written in the Hugging Face diffusers layout (model_index.json + one folder per component).

Same architectures and classes as the real checkpoints, at the real sample rates, hop sizes and channel
counts (so output length/rate/channels are what the real ones give), with a few hidden units each.
Tokenizers are hand-built offline (byte-level BPE without merges for Qwen/Roberta, a Unigram list for T5).
The Dance Diffusion config is written the OLD way (no `time_embedding_dim`), as the real maestro-150k
config is, so the loader's time-embedding quirk handling is exercised."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lib.tiny import _t5_tokenizer

TINY_MARKER = "TINY_RANDOM_WEIGHTS"


def _byte_vocab():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def _qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_byte_vocab())}
    vocab["<|endoftext|>"] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, pad_token="<|endoftext|>",
                          eos_token="<|endoftext|>")


def _roberta_tokenizer():
    from transformers import RobertaTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for c in _byte_vocab():
        vocab.setdefault(c, len(vocab))
    vocab["<mask>"] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _mark(directory: Path) -> Path:
    (directory / TINY_MARKER).write_text("Random weights for tests: the audio is noise.\n")
    return directory


# -- ACE-Step 1.5 ----------------------------------------------------------------------------------------

def build_ace_step(turbo: bool = True, seed: int = 0):
    from diffusers import AceStepPipeline, AutoencoderOobleck, FlowMatchEulerDiscreteScheduler
    from diffusers.models.transformers.ace_step_transformer import AceStepTransformer1DModel
    from diffusers.pipelines.ace_step.modeling_ace_step import (AceStepAudioTokenDetokenizer,
                                                                AceStepAudioTokenizer, AceStepConditionEncoder)
    from transformers import Qwen3Config, Qwen3Model

    acoustic = 8
    attn = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=10000.0, sliding_window=16)
    torch.manual_seed(seed)
    transformer = AceStepTransformer1DModel(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            in_channels=3 * acoustic, audio_acoustic_hidden_dim=acoustic,
                                            patch_size=2, is_turbo=turbo,
                                            model_version="turbo" if turbo else "base", **attn)
    tokenizer = _qwen_tokenizer()
    text_encoder = Qwen3Model(Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                          vocab_size=len(tokenizer), max_position_embeddings=4096))
    condition_encoder = AceStepConditionEncoder(hidden_size=32, intermediate_size=64, text_hidden_dim=32,
                                                timbre_hidden_dim=acoustic, num_lyric_encoder_hidden_layers=1,
                                                num_timbre_encoder_hidden_layers=1, **attn)
    with torch.no_grad():  # the real silence latent is a learned constant, not zeros
        condition_encoder.silence_latent.normal_(0, 0.5)
    pooled = dict(hidden_size=32, intermediate_size=64, audio_acoustic_hidden_dim=acoustic, pool_window_size=5,
                  num_attention_pooler_hidden_layers=1, **attn)
    audio_tokenizer = AceStepAudioTokenizer(fsq_dim=32, fsq_input_levels=[8, 5, 5], **pooled)
    audio_token_detokenizer = AceStepAudioTokenDetokenizer(**pooled)
    # 48 kHz stereo, hop 1920 -> 25 latents/s, as the real ACE-Step 1.5 VAE
    # (the encoder's width is 2 x the latent: mean and scale of the posterior)
    vae = AutoencoderOobleck(encoder_hidden_size=2 * acoustic, downsampling_ratios=[2, 4, 4, 6, 10],
                             channel_multiples=[1, 1, 1, 1, 1], decoder_channels=4,
                             decoder_input_channels=acoustic, audio_channels=2, sampling_rate=48000)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0)
    return AceStepPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                           condition_encoder=condition_encoder, scheduler=scheduler,
                           audio_tokenizer=audio_tokenizer, audio_token_detokenizer=audio_token_detokenizer)


# -- AudioLDM 2 and AudioLDM -----------------------------------------------------------------------------

def _vocoder():
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    # 16 kHz, hop 160 (100 mel frames/s), 64 mel bins: the real AudioLDM vocoder's geometry
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=64, sampling_rate=16000, upsample_initial_channel=16, upsample_rates=[8, 5, 4],
        upsample_kernel_sizes=[16, 10, 8], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
        normalize_before=False))
    return calibrate_vocoder(vocoder)


def calibrate_vocoder(vocoder, rms: float = 0.1):
    """A random HiFi-GAN outputs ~1e-7: scale its last conv so the noise it makes is audible (RMS ~`rms`) and
    loudness normalization has something to measure (bench/diffusion.py does the same to its full-size one)."""
    with torch.no_grad():
        mel = torch.randn(100, vocoder.config.model_in_dim, generator=torch.Generator().manual_seed(0), device="cpu")
        out = vocoder(mel.to(vocoder.conv_post.weight.device))
        vocoder.conv_post.weight.mul_(rms / float(out.std()))
        if vocoder.conv_post.bias is not None:
            vocoder.conv_post.bias.zero_()
    return vocoder


def _mel_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 16], in_channels=1, out_channels=1, norm_num_groups=4,
                         down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                         up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4)


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def _clap_text_config():
    from transformers import ClapTextConfig

    return ClapTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=16, intermediate_size=32,
                          num_attention_heads=2, num_hidden_layers=1, vocab_size=len(_roberta_tokenizer()),
                          projection_dim=16, max_position_embeddings=80)


def build_audioldm2(seed: int = 0):
    from diffusers import AudioLDM2Pipeline, AudioLDM2ProjectionModel, AudioLDM2UNet2DConditionModel
    from transformers import (ClapAudioConfig, ClapConfig, ClapFeatureExtractor, ClapModel, GPT2Config,
                              GPT2Model, T5Config, T5EncoderModel)

    torch.manual_seed(seed)
    unet = AudioLDM2UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                         sample_size=32, in_channels=4, out_channels=4, attention_head_dim=4,
                                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                         cross_attention_dim=([None, 16, 32], [None, 16, 32]))
    audio_config = ClapAudioConfig(spec_size=64, window_size=4, num_mel_bins=64, intermediate_size=16,
                                   depths=[1, 1], num_attention_heads=[2, 2], num_hidden_layers=2, hidden_size=16,
                                   projection_dim=16, patch_size=2, patch_stride=2, patch_embed_input_channels=4)
    text_encoder = ClapModel(ClapConfig(text_config=_clap_text_config().to_dict(),
                                        audio_config=audio_config.to_dict(), projection_dim=16))
    tokenizer_2 = _t5_tokenizer()
    tokenizer_2.model_max_length = 77
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_ff=32, d_kv=8,
                                             num_heads=2, num_layers=1))
    # Saved as GPT2Model, as the real cvssp/audioldm2-music is (the loader handles diffusers #12630)
    language_model = GPT2Model(GPT2Config(n_embd=16, n_head=2, n_layer=1, vocab_size=len(_roberta_tokenizer()),
                                          n_ctx=99, n_positions=99, bos_token_id=0, eos_token_id=2))
    language_model.config.max_new_tokens = 4
    projection_model = AudioLDM2ProjectionModel(text_encoder_dim=16, text_encoder_1_dim=32, langauge_model_dim=16)
    return AudioLDM2Pipeline(vae=_mel_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                             projection_model=projection_model, language_model=language_model,
                             tokenizer=_roberta_tokenizer(), tokenizer_2=tokenizer_2,
                             feature_extractor=ClapFeatureExtractor(), unet=unet, scheduler=_ddim(),
                             vocoder=_vocoder())


def build_audioldm(seed: int = 0):
    from diffusers import AudioLDMPipeline, UNet2DConditionModel
    from transformers import ClapTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32,
                                in_channels=4, out_channels=4, attention_head_dim=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=(8, 16),
                                class_embed_type="simple_projection", projection_class_embeddings_input_dim=16,
                                class_embeddings_concat=True)
    text_encoder = ClapTextModelWithProjection(_clap_text_config())
    return AudioLDMPipeline(vae=_mel_vae(), text_encoder=text_encoder, tokenizer=_roberta_tokenizer(), unet=unet,
                            scheduler=_ddim(), vocoder=_vocoder())


# -- Dance Diffusion --------------------------------------------------------------------------------------

def build_dance_diffusion(seed: int = 0):
    from diffusers import DanceDiffusionPipeline, IPNDMScheduler, UNet1DModel

    torch.manual_seed(seed)
    # maestro-150k's block layout, shortened: fourier time features of 16 channels fed as extra inputs, skip-less
    # first block, attention only at the deepest levels (32 channels = 1 head), 2^6 down in all. A first block of 16
    # channels makes the post-0.36 default time width (2 x 16 = 32) disagree with the 16 stored, as in maestro-150k.
    down = ("DownBlock1DNoSkip",) + ("DownBlock1D",) * 4 + ("AttnDownBlock1D",)
    up = ("AttnUpBlock1D",) + ("UpBlock1D",) * 4 + ("UpBlock1DNoSkip",)
    unet = UNet1DModel(block_out_channels=(16, 8, 8, 8, 32, 32), extra_in_channels=16, time_embedding_dim=16,
                       sample_size=65536, sample_rate=16000, in_channels=2, out_channels=2, flip_sin_to_cos=True,
                       use_timestep_embedding=False, time_embedding_type="fourier", mid_block_type="UNetMidBlock1D",
                       down_block_types=down, up_block_types=up, norm_num_groups=4)
    return DanceDiffusionPipeline(unet=unet, scheduler=IPNDMScheduler())


# -- Stable Audio Open ------------------------------------------------------------------------------------

def build_stable_audio(seed: int = 0):
    from diffusers import (AutoencoderOobleck, CosineDPMSolverMultistepScheduler, StableAudioDiTModel,
                           StableAudioPipeline, StableAudioProjectionModel)
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    latent = 8
    # 1024 latent frames x hop 2048 at 44.1 kHz = 47.55 s, as stable-audio-open-1.0
    transformer = StableAudioDiTModel(sample_size=1024, in_channels=latent, num_layers=1, attention_head_dim=8,
                                      num_attention_heads=2, num_key_value_attention_heads=1, out_channels=latent,
                                      cross_attention_dim=16, time_proj_dim=8, global_states_input_dim=32,
                                      cross_attention_input_dim=16)
    # the real repo's scheduler is the SDE variant (needs torchsde); we ship the same class and settings
    scheduler = CosineDPMSolverMultistepScheduler(solver_order=2, prediction_type="v_prediction", sigma_data=1.0,
                                                  sigma_min=0.3, sigma_max=500, sigma_schedule="exponential",
                                                  solver_type="midpoint")
    vae = AutoencoderOobleck(encoder_hidden_size=2 * latent, downsampling_ratios=[2, 4, 4, 8, 8],
                             channel_multiples=[1, 1, 1, 1, 1], decoder_channels=4, decoder_input_channels=latent,
                             audio_channels=2, sampling_rate=44100)
    tokenizer = _t5_tokenizer()
    tokenizer.model_max_length = 128
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=16, d_ff=32, d_kv=8, num_heads=2,
                                           num_layers=1))
    projection_model = StableAudioProjectionModel(text_encoder_dim=16, conditioning_dim=16, min_value=0,
                                                  max_value=512)
    return StableAudioPipeline(vae=vae, text_encoder=text_encoder, projection_model=projection_model,
                               tokenizer=tokenizer, transformer=transformer, scheduler=scheduler)


# -- writing ----------------------------------------------------------------------------------------------

def _write_pipeline(pipe, directory: Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(directory, safe_serialization=True)
    return _mark(directory)


def _write_dance_diffusion(directory: Path, seed: int) -> Path:
    directory = _write_pipeline(build_dance_diffusion(seed), directory)
    # The real harmonai configs predate `time_embedding_dim` (diffusers 0.8): write ours the same way.
    cfg_path = directory / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("time_embedding_dim", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return directory


BUILDERS = {
    # folder in weights/ -> writer; the same folder names lib.catalog uses for the real checkpoints
    "ace-step-1.5-turbo": lambda d, s: _write_pipeline(build_ace_step(turbo=True, seed=s), d),
    "ace-step-1.5-base": lambda d, s: _write_pipeline(build_ace_step(turbo=False, seed=s), d),
    "audioldm2-music": lambda d, s: _write_pipeline(build_audioldm2(s), d),
    "audioldm-s-full-v2": lambda d, s: _write_pipeline(build_audioldm(s), d),
    "dance-diffusion-maestro-150k": _write_dance_diffusion,
    "stable-audio-open-1.0": lambda d, s: _write_pipeline(build_stable_audio(s), d),
}


def write_all(root: Path) -> list[Path]:
    """Every tiny diffusion pipeline under root/<folder>/. Returns the folders written."""
    root = Path(root)
    return [write(root / name, 100 + i) for i, (name, write) in enumerate(BUILDERS.items())]
