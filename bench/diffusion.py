"""Our diffusion engines (lib/diffusion.py, as the predictor runs them on CUDA) against the stock diffusers pipeline
call, in one process, on random-init FULL-SIZE models (random weights cost what real ones cost), every engine.

Per engine, same request, steps and seed:
  stock_fp32  the plain pipeline call in fp32 as diffusers documents it (`pipe(...)`), output as the pipeline gives it
  stock_bfloat16  (ACE-Step only) the same call in bf16, the dtype ACE-Step's diffusers example loads it in
  ours_fp32   lib.diffusion's engine `run()` in fp32, every speed-up on: checks that our path gives the stock numbers
  ours        the engine as the predictor runs it on CUDA: the fp16 the service asks for becomes bf16 (Ampere+), the
              denoiser replayed as CUDA graphs (lib.cuda_graphs.DenoiserGraphs), Stable Audio decodes only the kept
              latent frames, Dance Diffusion's UNet1D rewrites (fast GroupNorm(1, C), per-channel resampling)
  ours_*      ablations of `ours` (one speed-up off, or cudnn.benchmark on): what each part is worth, and
              `vs_ours` = how far each moves the output (graph replay should be bit-identical to eager)
Each variant: one warm-up call with 2 steps, then `--reps` timed calls (wall time of `run()` / `pipe()` incl. the copy
to host; ours includes its per-request graph captures), peak GPU memory (max_memory_allocated, weights included),
and the max abs difference of the output against stock_fp32 (ACE-Step: both peak-normalized first, since the stock
call normalizes to -1 dBFS and ours leaves loudness to the service). `--profile` adds the top CUDA kernels of one
2-step run of the named variants (eager ones: a graph replay hides its kernels).

Models (every denoiser, VAE, vocoder and text encoder at full size, random weights; configs written from the model
cards / original configs / diffusers' conversion scripts, not copied from hub files; tokenizers are small offline
stand-ins, so token counts differ from the real ones):
  stable-audio     stabilityai/stable-audio-open-1.0: StableAudioDiTModel (24 layers, 24 heads x 64, 12 KV heads,
                   1024 latent frames), AutoencoderOobleck (128 ch, x[1,2,4,8,16]), T5-base, CosineDPMSolver (SDE)
  dance-diffusion  harmonai/maestro-150k's UNet1DModel laid out as its original DiffusionAttnUnet1D (depth 14,
                   channels 128,128,256,256,512 x 9 + mid, attention at the 6 deepest levels, 16 fourier time
                   features as extra inputs), 65536 samples at 16 kHz, IPNDM
  audioldm2        cvssp/audioldm2-music: AudioLDM2UNet2DConditionModel (128 ch x [1,2,3,5], 2 res blocks, attention
                   at the 3 deepest levels, cross-attention to GPT-2 (768) and Flan-T5 (1024), 347 M), KL VAE (128 ch
                   x [1,2,4], 8 latent ch), HiFi-GAN 16 kHz (1024 ch, x[5,4,2,2,2]), CLAP (RoBERTa-base text + HTSAT
                   audio), Flan-T5-large encoder, GPT-2 base (as GPT2LMHeadModel: the LM-head form our loader uses,
                   diffusers #12630), DDIM, CFG 3.5
  audioldm         cvssp/audioldm-s-full-v2: UNet2DConditionModel (the same widths, self-attention only, CLAP
                   embedding as a concatenated class embedding, 185 M), the same VAE and HiFi-GAN, CLAP text
                   (RoBERTa-base + 512 projection), DDIM, CFG 2.5
  ace-step         ACE-Step/acestep-v15-xl-turbo (the catalog's ace-step-1.5-turbo): AceStepTransformer1DModel XL (32
                   layers, 2560 wide, 32 heads x 128, 8 KV heads, MLP 9728, condition width 2048, 4.17 B),
                   AceStepConditionEncoder (2048 wide, 8 lyric + 4 timbre layers), Qwen3-Embedding-0.6B text encoder,
                   Oobleck VAE 48 kHz (x[2,4,4,6,10], 64 latent ch), flow matching, 8 turbo steps, no CFG
Approximations (also in the JSON): attention heads of the AudioLDM UNets are diffusers' default 8 per block (the
originals use 32-channel heads: same FLOPs, other head shapes); the ACE-Step audio tokenizer/detokenizer (cover from
audio codes only) are left out.

  python3 bench/diffusion.py --engines dance-diffusion,stable-audio --out $OUT            # GPU (see bench/README.md)
  python3 bench/diffusion.py --engines audioldm2,audioldm,ace-step --out $OUT
  BENCH_TINY=1 python3 bench/diffusion.py --steps 3 --engines stable-audio,dance-diffusion,audioldm2,audioldm,ace-step
                      # CPU dry run on lib/tiny_diffusion's tiny pipelines: every path but the CUDA graphs; "ours"
                      # runs fp32 there, Dance Diffusion's rewrites are switched on for the CPU
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lib import diffusion as D  # noqa: E402
from lib.catalog import MODELS  # noqa: E402
from lib.request import Request  # noqa: E402

TINY = os.environ.get("BENCH_TINY") == "1"
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
T0 = time.perf_counter()
# what the service passes on CUDA (the engines turn it into bf16 on Ampere+); the CPU dry run keeps fp32, as fp16
# convolutions crawl on a CPU
HALF = torch.float16 if DEV.type == "cuda" else torch.float32


def log(msg):
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def reset_peak():
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb():
    return round(torch.cuda.max_memory_allocated() / 1e9, 3) if DEV.type == "cuda" else None


def alloc_gb():
    return round(torch.cuda.memory_allocated() / 1e9, 3) if DEV.type == "cuda" else None


def params_m(*modules):
    return round(sum(p.numel() for m in modules for p in m.parameters()) / 1e6, 1)


# -- full-size random pipelines -------------------------------------------------------------------------------

def build_stable_audio(seed=0):
    if TINY:
        from lib.tiny_diffusion import build_stable_audio as tiny
        return tiny(seed).to(DEV)
    from diffusers import (AutoencoderOobleck, CosineDPMSolverMultistepScheduler, StableAudioDiTModel,
                           StableAudioPipeline, StableAudioProjectionModel)
    from transformers import T5Config, T5EncoderModel

    from lib.tiny import _t5_tokenizer

    torch.manual_seed(seed)
    with DEV:
        transformer = StableAudioDiTModel(sample_size=1024, in_channels=64, num_layers=24, attention_head_dim=64,
                                          num_attention_heads=24, num_key_value_attention_heads=12, out_channels=64,
                                          cross_attention_dim=768, time_proj_dim=256, global_states_input_dim=1536,
                                          cross_attention_input_dim=768)
        vae = AutoencoderOobleck(encoder_hidden_size=128, downsampling_ratios=[2, 4, 4, 8, 8],
                                 channel_multiples=[1, 2, 4, 8, 16], decoder_channels=128, decoder_input_channels=64,
                                 audio_channels=2, sampling_rate=44100)
        text_encoder = T5EncoderModel(T5Config(vocab_size=32128, d_model=768, d_ff=3072, d_kv=64, num_heads=12,
                                               num_layers=12))  # t5-base
        projection_model = StableAudioProjectionModel(text_encoder_dim=768, conditioning_dim=768, min_value=0,
                                                      max_value=512)
    scheduler = CosineDPMSolverMultistepScheduler(solver_order=2, prediction_type="v_prediction", sigma_data=1.0,
                                                  sigma_min=0.3, sigma_max=500, sigma_schedule="exponential",
                                                  solver_type="midpoint")
    tokenizer = _t5_tokenizer()  # a small offline vocab; the sequence is padded to 128 tokens as the real one
    tokenizer.model_max_length = 128
    return StableAudioPipeline(vae=vae, text_encoder=text_encoder, projection_model=projection_model,
                               tokenizer=tokenizer, transformer=transformer, scheduler=scheduler).to(DEV)


def build_dance_diffusion(seed=0):
    if TINY:
        from lib.tiny_diffusion import build_dance_diffusion as tiny
        return tiny(seed).to(DEV)
    from diffusers import DanceDiffusionPipeline, IPNDMScheduler, UNet1DModel

    torch.manual_seed(seed)
    channels = (128, 128, 256, 256) + (512,) * 9
    down = ("DownBlock1DNoSkip",) + ("DownBlock1D",) * 6 + ("AttnDownBlock1D",) * 6
    up = ("AttnUpBlock1D",) * 6 + ("UpBlock1D",) * 6 + ("UpBlock1DNoSkip",)
    with DEV:
        unet = UNet1DModel(block_out_channels=channels, extra_in_channels=16, time_embedding_dim=16,
                           sample_size=65536, sample_rate=16000, in_channels=2, out_channels=2, flip_sin_to_cos=True,
                           use_timestep_embedding=False, time_embedding_type="fourier",
                           mid_block_type="UNetMidBlock1D", down_block_types=down, up_block_types=up)
    return DanceDiffusionPipeline(unet=unet, scheduler=IPNDMScheduler()).to(DEV)


def _hifigan_16k():
    """AudioLDM / AudioLDM 2's vocoder: HiFi-GAN, 64 mel bins in, 16 kHz out (hop 160), 1024 initial channels."""
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    from lib.tiny_diffusion import calibrate_vocoder

    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=64, sampling_rate=16000, upsample_initial_channel=1024, upsample_rates=[5, 4, 2, 2, 2],
        upsample_kernel_sizes=[16, 16, 8, 4, 4], resblock_kernel_sizes=[3, 7, 11],
        resblock_dilation_sizes=[[1, 3, 5]] * 3, normalize_before=False))
    return calibrate_vocoder(vocoder)


def _mel_vae():
    """AudioLDM / AudioLDM 2's KL VAE on mel spectrograms: 128 ch x [1, 2, 4], 2 res blocks, 8 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(128, 256, 512), layers_per_block=2,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         latent_channels=8, sample_size=1024)


def _clap_tokenizer():
    from lib.tiny_diffusion import _roberta_tokenizer

    tok = _roberta_tokenizer()  # byte-level stand-in; padded to CLAP's 512 as the real RobertaTokenizer
    tok.model_max_length = 512
    return tok


# AudioLDM's UNet widths (model_channels 128, channel_mult 1,2,3,5; attention at resolutions 8, 4, 2)
_LDM_UNET = dict(sample_size=256, in_channels=8, out_channels=8, block_out_channels=(128, 256, 384, 640),
                 layers_per_block=2, down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
                 up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",))


def build_audioldm2(seed=0):
    if TINY:
        from transformers import GPT2LMHeadModel

        from lib.tiny_diffusion import build_audioldm2 as tiny
        pipe = tiny(seed)
        lm = GPT2LMHeadModel(pipe.language_model.config)  # what our loader loads a GPT2Model checkpoint as
        lm.transformer.load_state_dict(pipe.language_model.state_dict())
        pipe.register_modules(language_model=lm)
        return pipe.to(DEV)
    from diffusers import AudioLDM2Pipeline, AudioLDM2ProjectionModel, AudioLDM2UNet2DConditionModel
    from transformers import (ClapConfig, ClapFeatureExtractor, ClapModel, GPT2Config, GPT2LMHeadModel, T5Config,
                              T5EncoderModel)

    from lib.tiny import _t5_tokenizer
    from lib.tiny_diffusion import _ddim

    torch.manual_seed(seed)
    with DEV:
        unet = AudioLDM2UNet2DConditionModel(cross_attention_dim=([None, 768, 1024],) * 4, **_LDM_UNET)
        text_encoder = ClapModel(ClapConfig(projection_dim=512))  # laion/clap-htsat-unfused: RoBERTa-base + HTSAT
        text_encoder_2 = T5EncoderModel(T5Config(vocab_size=32128, d_model=1024, d_ff=2816, d_kv=64, num_heads=16,
                                                 num_layers=24, feed_forward_proj="gated-gelu"))  # flan-t5-large
        language_model = GPT2LMHeadModel(GPT2Config())  # gpt2 (base)
        language_model.config.max_new_tokens = 8
        projection_model = AudioLDM2ProjectionModel(text_encoder_dim=512, text_encoder_1_dim=1024,
                                                    langauge_model_dim=768)
        vae, vocoder = _mel_vae(), _hifigan_16k()
    tokenizer_2 = _t5_tokenizer()
    tokenizer_2.model_max_length = 128
    return AudioLDM2Pipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                             projection_model=projection_model, language_model=language_model,
                             tokenizer=_clap_tokenizer(), tokenizer_2=tokenizer_2,
                             feature_extractor=ClapFeatureExtractor(), unet=unet, scheduler=_ddim(),
                             vocoder=vocoder).to(DEV)


def build_audioldm(seed=0):
    if TINY:
        from lib.tiny_diffusion import build_audioldm as tiny
        return tiny(seed).to(DEV)
    from diffusers import AudioLDMPipeline, UNet2DConditionModel
    from transformers import ClapTextConfig, ClapTextModelWithProjection

    from lib.tiny_diffusion import _ddim

    torch.manual_seed(seed)
    with DEV:
        unet = UNet2DConditionModel(cross_attention_dim=_LDM_UNET["block_out_channels"],
                                    class_embed_type="simple_projection", projection_class_embeddings_input_dim=512,
                                    class_embeddings_concat=True, **_LDM_UNET)
        text_encoder = ClapTextModelWithProjection(ClapTextConfig(projection_dim=512))
        vae, vocoder = _mel_vae(), _hifigan_16k()
    return AudioLDMPipeline(vae=vae, text_encoder=text_encoder, tokenizer=_clap_tokenizer(), unet=unet,
                            scheduler=_ddim(), vocoder=vocoder).to(DEV)


def build_ace_step(seed=0):
    if TINY:
        from lib.tiny_diffusion import build_ace_step as tiny
        return tiny(turbo=True, seed=seed).to(DEV)
    from diffusers import AceStepPipeline, AutoencoderOobleck, FlowMatchEulerDiscreteScheduler
    from diffusers.models.transformers.ace_step_transformer import AceStepTransformer1DModel
    from diffusers.pipelines.ace_step.modeling_ace_step import AceStepConditionEncoder
    from transformers import Qwen3Config, Qwen3Model

    from lib.tiny_diffusion import _qwen_tokenizer

    torch.manual_seed(seed)
    gqa = dict(num_key_value_heads=8, head_dim=128, sliding_window=128)
    with DEV:
        transformer = AceStepTransformer1DModel(hidden_size=2560, intermediate_size=9728, num_hidden_layers=32,
                                                num_attention_heads=32, in_channels=192, audio_acoustic_hidden_dim=64,
                                                patch_size=2, encoder_hidden_size=2048, is_turbo=True,
                                                model_version="turbo", **gqa)
        condition_encoder = AceStepConditionEncoder(hidden_size=2048, intermediate_size=6144, text_hidden_dim=1024,
                                                    timbre_hidden_dim=64, num_lyric_encoder_hidden_layers=8,
                                                    num_timbre_encoder_hidden_layers=4, num_attention_heads=16, **gqa)
        with torch.no_grad():  # the real silence latent is the VAE's encoding of silence, not zeros
            condition_encoder.silence_latent.normal_(0, 0.5)
        text_encoder = Qwen3Model(Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                              num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                              vocab_size=151669, max_position_embeddings=32768,
                                              tie_word_embeddings=True))  # Qwen3-Embedding-0.6B
        vae = AutoencoderOobleck(encoder_hidden_size=128, downsampling_ratios=[2, 4, 4, 6, 10],
                                 channel_multiples=[1, 2, 4, 8, 16], decoder_channels=128, decoder_input_channels=64,
                                 audio_channels=2, sampling_rate=48000)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0)
    return AceStepPipeline(vae=vae, text_encoder=text_encoder, tokenizer=_qwen_tokenizer(), transformer=transformer,
                           condition_encoder=condition_encoder, scheduler=scheduler).to(DEV)


def engine_from(engine_class, spec, pipe, dtype):
    """lib.diffusion's engine, its __init__ run as is, on an in-memory pipeline instead of a folder."""

    class Bench(engine_class):
        def _load(self):
            return pipe.to(self.device, self.dtype)

    return Bench(spec, ROOT / "weights" / "none", DEV, dtype)


# -- the engines ----------------------------------------------------------------------------------------------

PROMPT = "warm analog synth pads, slow tempo"
LYRICS = "[verse]\nneon rivers in the rain\nwe keep dancing all the same\n[chorus]\nhold on, hold on"
GRAPHS_OFF = {"cuda_graphs": False}


@dataclass
class Case:
    spec: str  # lib.catalog model name
    engine: type
    build: Callable
    task: str
    request: Callable  # (args, steps) -> lib.request kwargs
    stock: Callable  # (pipe, args, steps, generator) -> the pipeline's output as (channels, samples) float32
    steps: Callable = lambda args: args.steps  # noqa: E731
    model: dict = field(default_factory=dict)  # what is built, for the JSON
    ablations: list = field(default_factory=list)  # (label, engine attribute overrides), run in bf16 after `ours`
    peak_normalize: bool = False
    stock_bf16: bool = False


def _np(x):
    return x.float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


def _stock_stable_audio(pipe, args, n, g):
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    return _np(pipe(prompt=PROMPT, audio_end_in_s=args.sa_seconds, num_inference_steps=n, guidance_scale=7.0,
                    generator=g).audios[0])


def _stock_dance(pipe, args, n, g):
    return _np(pipe(batch_size=1, num_inference_steps=n, generator=g,
                    audio_length_in_s=_dd_seconds(args)).audios[0])


def _stock_audioldm2(pipe, args, n, g):
    return _np(pipe(PROMPT, audio_length_in_s=args.ldm_seconds, num_inference_steps=n, guidance_scale=3.5,
                    generator=g).audios[0])[None]


def _stock_audioldm(pipe, args, n, g):
    return _np(pipe(PROMPT, audio_length_in_s=args.ldm_seconds, num_inference_steps=n, guidance_scale=2.5,
                    generator=g).audios[0])[None]


def _stock_ace(pipe, args, n, g):
    return _np(pipe(prompt=PROMPT, lyrics=LYRICS, audio_duration=args.ace_seconds, num_inference_steps=n,
                    guidance_scale=1.0, shift=3.0, bpm=120, keyscale="C major", timesignature="4",
                    vocal_language="en", generator=g).audios[0])


def _dd_seconds(args):
    return args.dd_samples / 16000


CASES = {
    "stable-audio": Case(
        spec="stable-audio-open", engine=D.StableAudioEngine, build=build_stable_audio, task="text2music",
        stock=_stock_stable_audio,
        request=lambda args, n: dict(prompt=PROMPT, duration=args.sa_seconds, num_inference_steps=n,
                                     guidance_scale=7.0),
        model=dict(repo="stabilityai/stable-audio-open-1.0", full_size="every component",
                   denoiser="StableAudioDiTModel: 24 layers, 24 heads x 64, 12 KV heads, 1024 latent frames",
                   vae="AutoencoderOobleck 44.1 kHz: 128 ch x [1,2,4,8,16], strides 2,4,4,8,8, 64 latent ch",
                   text="T5-base encoder (tokenizer: small offline vocab, padded to 128 as the real one)",
                   scheduler="CosineDPMSolverMultistepScheduler (SDE, torchsde), CFG 7"),
        ablations=[("ours_no_graphs", GRAPHS_OFF), ("ours_stock_snake", {"fused_snake": False})]),
    "dance-diffusion": Case(
        spec="dance-diffusion-maestro", engine=D.DanceDiffusionEngine, build=build_dance_diffusion,
        task="unconditional", stock=_stock_dance,
        request=lambda args, n: dict(duration=_dd_seconds(args), num_inference_steps=n),
        model=dict(repo="harmonai/maestro-150k", full_size="every component (the UNet is the whole model)",
                   denoiser="UNet1DModel as the original DiffusionAttnUnet1D: depth 14, channels 128,128,256,256,"
                            "512 x 9 + mid, attention at the 6 deepest levels, 16 fourier time features as extra "
                            "inputs (written from the original model's defaults)",
                   scheduler="IPNDM", length="--dd-samples samples at 16 kHz"),
        ablations=[("ours_no_graphs", GRAPHS_OFF),
                   ("ours_no_fast_norm", {"fast_norm": False}),
                   ("ours_no_fast_resample", {"fast_resample": False}),
                   ("ours_graphs_only", {"fast_norm": False, "fast_resample": False}),
                   ("ours_plain", {"fast_norm": False, "fast_resample": False, **GRAPHS_OFF}),  # the old path
                   ("ours_cudnn_benchmark", {"cudnn_benchmark": True})]),
    "audioldm2": Case(
        spec="audioldm2-music", engine=D.AudioLDM2Engine, build=build_audioldm2, task="text2audio",
        stock=_stock_audioldm2,
        request=lambda args, n: dict(prompt=PROMPT, duration=args.ldm_seconds, num_inference_steps=n,
                                     guidance_scale=3.5),
        model=dict(repo="cvssp/audioldm2-music", full_size="every component",
                   denoiser="AudioLDM2UNet2DConditionModel: 128 ch x [1,2,3,5], 2 res blocks, attention at the 3 "
                            "deepest levels, cross-attention to GPT-2 (768) and Flan-T5 (1024); attention heads: "
                            "diffusers' default 8 per block (the original: 32-channel heads)",
                   vae="AutoencoderKL on 64-bin mels: 128 ch x [1,2,4], 8 latent ch",
                   vocoder="HiFi-GAN 16 kHz: 1024 ch, upsampling 5,4,2,2,2 (last conv rescaled: random ones are "
                           "near-silent)",
                   text="CLAP (RoBERTa-base text + HTSAT audio), Flan-T5-large encoder, GPT-2 base generating 8 "
                        "embeddings (GPT2LMHeadModel, as our loader loads the repo's GPT2Model, diffusers #12630); "
                        "tokenizers: small offline stand-ins (CLAP padded to 512, T5 to 128)",
                   scheduler="DDIM, CFG 3.5"),
        ablations=[("ours_no_graphs", GRAPHS_OFF)]),
    "audioldm": Case(
        spec="audioldm", engine=D.AudioLDMEngine, build=build_audioldm, task="text2audio",
        stock=_stock_audioldm,
        request=lambda args, n: dict(prompt=PROMPT, duration=args.ldm_seconds, num_inference_steps=n,
                                     guidance_scale=2.5),
        model=dict(repo="cvssp/audioldm-s-full-v2", full_size="every component",
                   denoiser="UNet2DConditionModel: 128 ch x [1,2,3,5], 2 res blocks, self-attention at the 3 "
                            "deepest levels, CLAP embedding concatenated to the time embedding; heads: diffusers' "
                            "default 8 per block (the original: 32-channel heads)",
                   vae="AutoencoderKL on 64-bin mels: 128 ch x [1,2,4], 8 latent ch",
                   vocoder="HiFi-GAN 16 kHz as AudioLDM 2's", text="CLAP text: RoBERTa-base + 512 projection "
                                                                    "(tokenizer: offline stand-in padded to 512)",
                   scheduler="DDIM, CFG 2.5"),
        ablations=[("ours_no_graphs", GRAPHS_OFF)]),
    "ace-step": Case(
        spec="ace-step-1.5-turbo", engine=D.AceStepEngine, build=build_ace_step, task="text2music",
        stock=_stock_ace, steps=lambda args: args.ace_steps, peak_normalize=True, stock_bf16=True,
        request=lambda args, n: dict(prompt=PROMPT, lyrics=LYRICS, duration=args.ace_seconds, num_inference_steps=n,
                                     bpm=120, keyscale="C major", timesignature=4, vocal_language="en"),
        model=dict(repo="ACE-Step/acestep-v15-xl-turbo-diffusers",
                   full_size="DiT, condition encoder, text encoder and VAE; left out: the audio tokenizer/"
                             "detokenizer (used only for cover from audio codes)",
                   denoiser="AceStepTransformer1DModel XL: 32 layers, 2560 wide, 32 heads x 128, 8 KV heads, MLP "
                            "9728, sliding window 128 on alternate layers, condition width 2048",
                   condition_encoder="2048 wide, MLP 6144, 8 lyric + 4 timbre layers",
                   text="Qwen3-Embedding-0.6B (28 layers, 1024 wide, vocab 151669); tokenizer: byte-level "
                        "stand-in (about 3-4x more tokens than Qwen's BPE for the same text, capped at 256)",
                   vae="AutoencoderOobleck 48 kHz stereo: 128 ch x [1,2,4,8,16], strides 2,4,4,6,10 (25 latents/"
                       "s), 64 latent ch",
                   scheduler="flow matching Euler, shift 3, turbo: no CFG"),
        ablations=[("ours_no_graphs", GRAPHS_OFF), ("ours_stock_snake", {"fused_snake": False}),
                   ("ours_stock_blocks", {"fused_dit": False}),
                   ("ours_graphs_only", {"fused_snake": False, "contiguous_tokens": False, "fused_dit": False})]),
}


# -- measuring ------------------------------------------------------------------------------------------------

def timed(fn, reps):
    """fn() -> np.ndarray; returns (last output, [seconds], peak GB)."""
    reset_peak()
    times, out = [], None
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(round(time.perf_counter() - t, 4))
    return out, times, peak_gb()


def compare(a, b, peak_normalize=False):
    n = min(a.shape[-1], b.shape[-1])
    a, b = np.asarray(a, np.float64)[..., :n], np.asarray(b, np.float64)[..., :n]
    if peak_normalize:
        a, b = a / max(np.abs(a).max(), 1e-30), b / max(np.abs(b).max(), 1e-30)
    d = np.abs(a - b)
    rms = float(np.sqrt(np.mean(a ** 2)))
    return dict(max_abs_diff=float(d.max()), mean_abs_diff=float(d.mean()), ref_max_abs=float(np.abs(a).max()),
                ref_rms=rms, snr_db=float(10 * np.log10(np.mean(a ** 2) / max(np.mean((a - b) ** 2), 1e-30))),
                shape_equal=bool(a.shape == b.shape), peak_normalized=peak_normalize)


def record(entry, name, out, times, peak, refs=(), **extra):
    e = dict(seconds=times, best_s=min(times), peak_gb=peak, shape=list(out.shape), finite=bool(np.isfinite(out).all()),
             **extra)
    for key, ref, norm in refs:
        if ref is not None:
            e[key] = compare(ref, out, norm)
    entry[name] = e
    vs = e.get("vs_stock")
    log(f"  {name}: best {e['best_s']:.3f}s {times} peak {peak} GB" +
        (f" max|diff| {vs['max_abs_diff']:.3g} (ref max {vs['ref_max_abs']:.3g}, snr {vs['snr_db']:.1f} dB)"
         if vs else "") + (f" vs ours {e['vs_ours']['max_abs_diff']:.3g}" if "vs_ours" in e else "") +
        (f" [{e['graphs']}]" if e.get("graphs") else ""))
    return e


def kernel_rows(fn):
    """One call of fn under the profiler: (name, self time in us, calls) per CUDA kernel (per op on the CPU), the
    slowest first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = DEV.type == "cuda"
    with torch_profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        sync()

    def us(e):
        if cuda:
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        return e.self_cpu_time_total

    return sorted(((e.key, us(e), e.count) for e in prof.key_averages() if us(e) > 0), key=lambda r: -r[1])


def profile(fn, top=12):
    """The kernels (CUDA) or ops (CPU) that take the most time in one call of fn."""
    rows = kernel_rows(fn)
    total = sum(us for _, us, _ in rows)
    return dict(what="self CUDA time per kernel" if DEV.type == "cuda" else "self CPU time per op (no CUDA here)",
                total_ms=round(total / 1e3, 2),
                top=[dict(name=name[:120], ms=round(us / 1e3, 3), calls=n, share=round(us / max(total, 1), 3))
                     for name, us, n in rows[:top]])


def stage_times(pipe, fn):
    """Where one call of fn's wall time goes: GPU-synchronized time inside each pipeline component's forward (the
    VAE's encoder and decoder separately; a module called inside another counts only in the outer one) and the
    rest (host work between them), in ms. The syncs themselves cost a little; the total is reported with them."""
    mods = {k: m for k, m in pipe.components.items() if isinstance(m, torch.nn.Module) and k != "vae"}
    vae = getattr(pipe, "vae", None)
    for part in ("encoder", "decoder"):
        if vae is not None and isinstance(getattr(vae, part, None), torch.nn.Module):
            mods[f"vae.{part}"] = getattr(vae, part)
    spent, calls, depth, handles = {k: 0.0 for k in mods}, {k: 0 for k in mods}, [0], []
    starts = {}

    def pre(key):
        def hook(*_a, **_k):
            depth[0] += 1
            if depth[0] == 1:
                sync()
                starts[key] = time.perf_counter()
        return hook

    def post(key):
        def hook(*_a, **_k):
            depth[0] -= 1
            if depth[0] == 0:
                sync()
                spent[key] += time.perf_counter() - starts[key]
                calls[key] += 1
        return hook

    for key, m in mods.items():
        handles += [m.register_forward_pre_hook(pre(key)), m.register_forward_hook(post(key))]
    try:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        total = time.perf_counter() - t
    finally:
        for h in handles:
            h.remove()
    out = {k: dict(ms=round(v * 1e3, 1), calls=calls[k]) for k, v in spent.items() if calls[k]}
    return dict(total_ms=round(total * 1e3, 1), components=out,
                rest_ms=round((total - sum(spent.values())) * 1e3, 1))


def bench_engine(name, args, results, save):
    case = CASES[name]
    spec = MODELS[case.spec]
    entry = results["engines"].setdefault(name, {})
    steps, seed = case.steps(args), args.seed
    quiet = lambda m: None  # noqa: E731

    def req(n):
        return Request(model_version=spec.name, **case.request(args, n))

    base = alloc_gb()  # what an earlier engine left allocated (0 once freed: see the end of main's loop)
    t = time.perf_counter()
    pipe = case.build(args.build_seed)
    pipe.set_progress_bar_config(disable=True)
    sync()
    components = {k: m for k, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    entry.update(build_s=round(time.perf_counter() - t, 2), duration_s=req(steps).duration, steps=steps, seed=seed,
                 model=case.model, denoiser=case.engine.denoiser,
                 params_m={**{k: params_m(m) for k, m in components.items()},
                           "total": params_m(*components.values())},
                 allocated_before_build_gb=base, weights_fp32_gb=alloc_gb())
    log(f"{name}: built in {entry['build_s']}s, {entry['params_m']} M params")

    def stock(n):
        torch.manual_seed(seed)
        return case.stock(pipe, args, n, torch.Generator("cpu").manual_seed(seed))

    with torch.inference_mode():
        stock(2)
        ref, times, peak = timed(lambda: stock(steps), args.reps)
    record(entry, "stock_fp32", ref, times, peak, dtype="torch.float32")
    save()
    refs = [("vs_stock", ref, case.peak_normalize)]

    def measure(label, dtype, overrides, extra_refs=()):
        reset_peak()
        engine = engine_from(case.engine, spec, pipe, dtype)
        if TINY and case.engine is D.DanceDiffusionEngine:
            engine.fast_devices = ("cuda", "cpu")  # run the UNet1D rewrites on this CPU too (the service doesn't)
        for k, v in overrides.items():
            assert hasattr(engine, k), k
            setattr(engine, k, v)
        lines = []
        run = lambda n: engine.run(req(n), case.task, seed, lines.append)  # noqa: E731
        run(2)
        lines.clear()
        out, times, peak = timed(lambda: run(steps), args.reps)
        graphs = next((ln.split(": ", 1)[1] for ln in reversed(lines) if "cuda graphs:" in ln), None)
        record(entry, label, out, times, peak, refs=(*refs, *extra_refs), dtype=str(engine.dtype),
               overrides=overrides or None, graphs=graphs)
        if label in args.stages:
            entry[label]["stages"] = stage_times(engine.pipe, lambda: run(steps))
            log(f"  {label} stages: {entry[label]['stages']}")
        if label in args.profile:
            try:
                entry[label]["profile"] = profile(lambda: run(2))
                log(f"  {label} profile (2 steps): {entry[label]['profile']['total_ms']} ms, top: " +
                    ", ".join(f"{r['name'][:40]} {r['ms']}" for r in entry[label]["profile"]["top"][:4]))
            except Exception as exc:  # report, keep the rest
                entry[label]["profile"] = dict(error=f"{type(exc).__name__}: {exc}"[:500])
        save()
        return engine, out

    def stock_half():
        # the dtype our engine runs: bf16 on Ampere+ (bf16 on the CPU dry run too, where ours stays fp32)
        half = engine_from(case.engine, spec, pipe, HALF).dtype if DEV.type == "cuda" else torch.bfloat16
        label = f"stock_{str(half).split('.')[-1]}"
        pipe.to(DEV, half)
        with torch.inference_mode():
            stock(2)
            out, times, peak = timed(lambda: stock(steps), args.reps)
            if label in args.stages:
                stages = stage_times(pipe, lambda: stock(steps))
        record(entry, label, out, times, peak, refs=refs, dtype=str(half))
        if label in args.stages:
            entry[label]["stages"] = stages
            log(f"  {label} stages: {stages}")
        refs.append((f"vs_{label}", out, case.peak_normalize))
        save()

    def attempt(label, fn, *a, **kw):
        """fn(*a, **kw), its error reported under `label` instead of ending this engine's run."""
        try:
            return fn(*a, **kw)
        except Exception as exc:
            entry[label] = dict(error=f"{type(exc).__name__}: {exc}"[:2000])
            log(traceback.format_exc())
            save()
            return None, None

    if args.ours_fp32:
        attempt("ours_fp32", measure, "ours_fp32", torch.float32, {})
    if case.stock_bf16:
        attempt("stock_half", stock_half)
    engine, ours = attempt("ours", measure, "ours", HALF, {})
    for label, overrides in case.ablations:
        if label not in args.skip:
            attempt(label, measure, label, HALF, overrides, extra_refs=[("vs_ours", ours, case.peak_normalize)])

    if name in args.compile and engine is not None and time.perf_counter() - T0 < args.compile_deadline:
        try:
            engine.cuda_graphs = False  # the compiled module's own call path, no graph wrapper around it
            mod = getattr(engine.pipe, engine.denoiser)
            mod.compile(mode=args.compile_mode, dynamic=False)
            run = lambda n: engine.run(req(n), case.task, seed, quiet)  # noqa: E731
            sync()
            t = time.perf_counter()
            run(steps)
            sync()
            first = round(time.perf_counter() - t, 2)
            out, times, peak = timed(lambda: run(steps), args.reps)
            record(entry, "ours_compiled", out, times, peak, refs=(*refs, ("vs_ours", ours, case.peak_normalize)),
                   dtype=str(engine.dtype), mode=args.compile_mode, first_call_s=first,
                   compile_s=round(first - min(times), 2))
        except Exception as exc:  # report, keep the rest
            entry["ours_compiled"] = dict(error=f"{type(exc).__name__}: {exc}"[:2000])
            log(traceback.format_exc())
    elif name in args.compile:
        entry["ours_compiled"] = dict(skipped=f"past the {args.compile_deadline}s deadline")

    for base_name in ("stock_fp32", "stock_bfloat16", "stock_float16"):
        if base_name in entry:
            s = entry[base_name]["best_s"]
            entry[f"speedup_vs_{base_name}"] = {k: round(s / v["best_s"], 2) for k, v in entry.items()
                                                if isinstance(v, dict) and "best_s" in v and k != base_name}
    log(f"{name}: speed-up vs stock fp32 {entry.get('speedup_vs_stock_fp32')}")
    save()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default="dance-diffusion,stable-audio,audioldm2,audioldm,ace-step",
                    help=f"comma-separated, of: {', '.join(CASES)}")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps (every engine but ACE-Step)")
    ap.add_argument("--ace-steps", type=int, default=8, help="ACE-Step steps (turbo's default: 8)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--build-seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--sa-seconds", type=float, default=30.0)
    ap.add_argument("--dd-samples", type=int, default=65536)
    ap.add_argument("--ldm-seconds", type=float, default=10.0, help="AudioLDM / AudioLDM 2 clip length")
    ap.add_argument("--ace-seconds", type=float, default=60.0)
    ap.add_argument("--profile", default="ours_plain,ours_no_graphs",
                    help="variants whose 2-step run is profiled (top kernels)")
    ap.add_argument("--stages", default="ours,stock_bfloat16",
                    help="variants whose timed call is also split by pipeline component (synchronized)")
    ap.add_argument("--skip", default="", help="ablation variants to leave out")
    ap.add_argument("--compile", default="", help="engines whose denoiser to also compile (slow: ~50-110 s each)")
    ap.add_argument("--compile-mode", default="default")
    ap.add_argument("--compile-deadline", type=float, default=150.0, help="skip compiling past this many seconds")
    ap.add_argument("--no-ours-fp32", dest="ours_fp32", action="store_false")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    args.compile, args.profile, args.skip, args.stages = ([c for c in v.split(",") if c] for v in (
        args.compile, args.profile, args.skip, args.stages))
    engines = [e for e in args.engines.split(",") if e]
    unknown = [e for e in engines if e not in CASES]
    if unknown:
        ap.error(f"unknown engine(s) {unknown}; known: {', '.join(CASES)}")
    if TINY:
        args.sa_seconds = min(args.sa_seconds, 2.0)
        args.dd_samples = min(args.dd_samples, 16384)
        args.ldm_seconds = min(args.ldm_seconds, 1.0)
        args.ace_seconds = min(args.ace_seconds, 2.0)
    import diffusers
    import transformers

    results = dict(command="python3 " + " ".join(sys.argv), tiny=TINY, argv=vars(args),
                   versions=dict(torch=torch.__version__, diffusers=diffusers.__version__,
                                 transformers=transformers.__version__, python=platform.python_version(),
                                 cuda=torch.version.cuda),
                   gpu=torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu",
                   settings=dict(tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                                 cudnn_tf32=torch.backends.cudnn.allow_tf32,
                                 cudnn_benchmark=torch.backends.cudnn.benchmark), engines={})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / ("diffusion-tiny.json" if TINY else "diffusion.json")

    def save():
        results["elapsed_s"] = round(time.perf_counter() - T0, 1)
        path.write_text(json.dumps(results, indent=1))

    for name in engines:
        try:
            bench_engine(name, args, results, save)
        except Exception as exc:
            results["engines"].setdefault(name, {})["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            log(traceback.format_exc())
        save()
        # a compiled module's dynamo cache holds its weights: reset, so the next engine starts from 0 allocated
        torch._dynamo.reset()
        gc.collect()
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
            log(f"after {name}: {alloc_gb()} GB still allocated")
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
