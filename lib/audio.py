"""Audio in and out: safe decoding of untrusted files, loudness normalization, WAV/FLAC/MP3 encoding.

Decoding runs the system ffmpeg in a subprocess (a crash or hang in a demuxer cannot take the server
down) restricted to local files: only the `file` and `pipe` protocols and an allowlist of plain audio
container demuxers, so a crafted "audio" file (an HLS playlist, an ffconcat list) cannot make ffmpeg
read other local files or the network.
"""
from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import numpy as np

from lib.errors import UserError

# Demuxers of ordinary audio containers. Deliberately absent: concat, hls, playlists, image2, lavfi, data.
SAFE_DEMUXERS = "wav,w64,mp3,flac,ogg,mov,mp4,m4a,matroska,webm,aac,aiff,caf,wv,au,tta,ape,amr"
MAX_INPUT_BYTES = 200 * 1024 * 1024  # larger uploads are refused before decoding
MAX_INPUT_SECONDS = 600.0  # longer inputs are refused (we only ever use up to a few minutes)
DECODE_TIMEOUT_S = 120

LOUDNESS_TARGET_LUFS = -14.0  # ITU-R BS.1770-4, as Replicate's MusicGen
PEAK_TARGET_DBFS = -1.0
RMS_TARGET_DBFS = -18.0
# Below this RMS the clip is treated as silence and loudness normalization is skipped (it would blow
# noise up by 60+ dB, or divide by zero on digital silence). Same role as audiocraft's energy floor.
ENERGY_FLOOR_RMS = 2e-3
MP3_BITRATE_KBPS = 320

OUTPUT_FORMATS = ("wav", "mp3", "flac")
NORMALIZATION_STRATEGIES = ("loudness", "clip", "peak", "rms")


def _ffmpeg() -> str:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise RuntimeError("ffmpeg is not installed: it is needed to decode input audio (apt-get install ffmpeg)")
    return exe


def load_audio(path, sample_rate: int, channels: int, field: str = "input_audio",
               max_seconds: float = MAX_INPUT_SECONDS) -> np.ndarray:
    """Decode any audio file ffmpeg knows into float32 (channels, samples) at `sample_rate`.

    Mono sources are duplicated to stereo and multichannel sources are downmixed by ffmpeg. Every
    failure is a UserError naming `field`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(field, "the file could not be found or is not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise UserError(field, "the file is empty: upload an audio file (wav, mp3, flac, ogg or m4a)")
    if size > MAX_INPUT_BYTES:
        raise UserError(field, f"the file is {size / 2**20:.0f} MiB, over the {MAX_INPUT_BYTES // 2**20} MiB limit: "
                               "trim or compress it")
    cmd = [_ffmpeg(), "-nostdin", "-hide_banner", "-loglevel", "error",
           "-protocol_whitelist", "file,pipe", "-format_whitelist", SAFE_DEMUXERS,
           "-i", f"file:{path.resolve()}",
           "-map", "0:a:0", "-vn", "-sn", "-dn",
           # one second past the limit tells "too long" apart from "exactly at the limit"
           "-t", f"{max_seconds + 1:.3f}",
           "-f", "f32le", "-acodec", "pcm_f32le", "-ac", str(channels), "-ar", str(sample_rate), "pipe:1"]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=DECODE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserError(field, f"decoding took longer than {DECODE_TIMEOUT_S} s: upload a shorter or simpler audio file")
    if proc.returncode != 0:
        detail = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        detail = detail[-1] if detail else f"ffmpeg exit code {proc.returncode}"
        detail = detail.replace(f"file:{path.resolve()}: ", "")[:200]  # the server's temp path means nothing to users
        if "matches no streams" in detail or "Stream map" in detail:
            raise UserError(field, "the file has no audio stream: upload an audio file (wav, mp3, flac, ogg or m4a)")
        raise UserError(field, f"the file could not be decoded as audio ({detail}): upload a wav, mp3, flac, "
                               "ogg or m4a file")
    audio = np.frombuffer(proc.stdout, dtype=np.float32)
    if audio.size < channels:
        raise UserError(field, "the file contains no audio samples")
    audio = audio[: audio.size - audio.size % channels].reshape(-1, channels).T.copy()
    if audio.shape[1] > max_seconds * sample_rate:
        raise UserError(field, f"the audio is longer than the {max_seconds:.0f} s limit: trim it")
    if not np.isfinite(audio).all():
        raise UserError(field, "the audio contains NaN or infinite samples: re-export it as normal PCM audio")
    return audio


def _rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0


def loudness_lufs(audio: np.ndarray, sample_rate: int) -> float:
    """Integrated loudness (ITU-R BS.1770-4) of (channels, samples) audio; -inf for silence."""
    import pyloudnorm

    data = audio.T.astype(np.float64)
    min_len = int(0.4 * sample_rate) + 1  # pyloudnorm needs one 400 ms gating block
    if data.shape[0] < min_len:
        # a clip shorter than one gating block: measure it repeated (same stationary loudness)
        data = np.tile(data, (math.ceil(min_len / max(data.shape[0], 1)), 1))
    return float(pyloudnorm.Meter(sample_rate).integrated_loudness(data))


def normalize(audio: np.ndarray, sample_rate: int, strategy: str) -> np.ndarray:
    """Normalize float (channels, samples) audio. Never returns NaN/inf; always within [-1, 1]."""
    audio = np.nan_to_num(audio.astype(np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    if strategy == "clip":
        pass
    elif strategy == "peak":
        if peak > 0:
            audio = audio * (10 ** (PEAK_TARGET_DBFS / 20) / peak)
    elif strategy == "rms":
        rms = _rms(audio)
        if rms > 0:
            audio = audio * (10 ** (RMS_TARGET_DBFS / 20) / rms)
    elif strategy == "loudness":
        if _rms(audio) >= ENERGY_FLOOR_RMS:
            lufs = loudness_lufs(audio, sample_rate)
            if math.isfinite(lufs):
                audio = audio * (10 ** ((LOUDNESS_TARGET_LUFS - lufs) / 20))
    else:
        raise ValueError(f"unknown normalization strategy {strategy!r}")
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def warm_up() -> None:
    """Import the loudness meter and the encoders now (setup): their first use costs ~0.8 s of imports (scipy), which
    the first request would otherwise pay."""
    import tempfile

    noise = np.random.default_rng(0).standard_normal((1, 16000)).astype(np.float32) * 0.1
    audio = normalize(noise, 16000, "loudness")
    with tempfile.TemporaryDirectory() as d:
        write_audio(audio, 16000, "wav", Path(d) / "warm.wav")


def write_audio(audio: np.ndarray, sample_rate: int, fmt: str, path: Path) -> Path:
    """Encode (channels, samples) float audio: WAV 16-bit PCM, FLAC 16-bit, MP3 320 kbps CBR."""
    import soundfile

    path = Path(path)
    data = np.ascontiguousarray(audio.T)
    if fmt == "wav":
        soundfile.write(path, data, sample_rate, format="WAV", subtype="PCM_16")
    elif fmt == "flac":
        soundfile.write(path, data, sample_rate, format="FLAC", subtype="PCM_16")
    elif fmt == "mp3":
        # libmp3lame through libsndfile: CONSTANT mode at compression level 0 is 320 kbps CBR
        soundfile.write(path, data, sample_rate, format="MP3", subtype="MPEG_LAYER_III",
                        bitrate_mode="CONSTANT", compression_level=0.0)
    else:
        raise ValueError(f"unknown output format {fmt!r}")
    if not path.exists() or path.stat().st_size == 0:
        raise RuntimeError(f"encoding {fmt} produced no file")
    return path


def mp3_bitrate_kbps(path) -> int:
    """Bitrate from the first MPEG audio frame header (skipping an ID3v2 tag and a Xing/Info frame)."""
    data = Path(path).read_bytes()
    i = 0
    if data[:3] == b"ID3":
        size = (data[6] << 21) | (data[7] << 14) | (data[8] << 7) | data[9]
        i = 10 + size
    rates = {  # (version bit) -> kbps table for layer III
        1: [0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 0],
        0: [0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160, 0],
    }
    while i < len(data) - 4:
        if data[i] == 0xFF and (data[i + 1] & 0xE0) == 0xE0:
            version_bit = (data[i + 1] >> 3) & 1
            return rates[version_bit][data[i + 2] >> 4]
        i += 1
    raise ValueError("no MPEG audio frame found")

