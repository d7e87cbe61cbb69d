"""Melody conditioning for MusicGen-melody: a one-hot chromagram, computed with torch.stft alone.

transformers' MusicgenMelodyFeatureExtractor needs torchaudio (not installable beside our torch); this is
the same computation: power spectrogram (n_fft 16384, hop 4096, Hann, centered), the librosa chroma filter
bank, max-normalization, then one-hot of the strongest pitch class per frame. Only the argmax survives, so
spectrogram scaling conventions do not matter. Unlike audiocraft we do not separate stems with Demucs
first (no Demucs weights here): drums and bass in the input also shape the chroma."""
from __future__ import annotations

import math
from functools import lru_cache

import torch

N_FFT = 16384
HOP = 4096
NUM_CHROMA = 12


@lru_cache(maxsize=4)
def _filters(sample_rate: int) -> torch.Tensor:
    from transformers.audio_utils import chroma_filter_bank

    bank = chroma_filter_bank(sampling_rate=sample_rate, num_frequency_bins=N_FFT, tuning=0, num_chroma=NUM_CHROMA)
    return torch.from_numpy(bank).float()


def frames_per_second(sample_rate: int) -> float:
    return sample_rate / HOP


def chromagram(wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """wav (samples,) mono float -> one-hot chroma (frames, 12)."""
    wav = wav.float()
    if wav.shape[-1] < N_FFT:
        pad = N_FFT - wav.shape[-1]
        wav = torch.nn.functional.pad(wav, (pad // 2, pad - pad // 2))
    window = torch.hann_window(N_FFT, device=wav.device)
    spec = torch.stft(wav, n_fft=N_FFT, hop_length=HOP, win_length=N_FFT, window=window, center=True,
                      pad_mode="reflect", return_complex=True).abs().pow(2)  # (freq, frames)
    raw = _filters(sample_rate).to(wav.device) @ spec  # (12, frames)
    idx = raw.argmax(dim=0)
    return torch.nn.functional.one_hot(idx, NUM_CHROMA).float()


def window(chroma: torch.Tensor, start_s: float, length_frames: int, sample_rate: int) -> torch.Tensor:
    """`length_frames` chroma frames starting at `start_s`, looping the melody when it is shorter than the
    music asked for (as MusicGen's reference does with short melodies)."""
    start = int(round(start_s * frames_per_second(sample_rate)))
    idx = (torch.arange(length_frames) + start) % chroma.shape[0]
    return chroma[idx]


def frames_for(seconds: float, sample_rate: int) -> int:
    return max(1, math.ceil(seconds * frames_per_second(sample_rate)))
