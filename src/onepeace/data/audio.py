"""Audio loading and the official audio preprocessing (spec §2.2 items 7-8, §6.3, §7).

Per clip: read as float32, average the channels, resample to 16 kHz with soxr "HQ" (librosa's
default ``soxr_hq``, used by the official API) -> standardise over the whole clip (layer norm
without affine, eps 1e-5) -> keep the first ``max_duration`` seconds -> tile clips shorter than
1 s and cut them to exactly 1 s. A batch is right-padded with 0.0; its padding mask (True = pad)
has ``T_i + 1`` False entries per clip (cls + frames), computed from the clip length, not from
the waveform values.

Files and bytes are decoded in blocks (:func:`read_audio`): the batch path keeps only the first
``max_duration`` seconds in memory and gathers the whole-clip mean and variance in the same streaming
pass, so a 2-hour file costs a few MB instead of its decoded size. A clip no longer than
``max_duration`` is standardised exactly as before (bit-identical); a longer one is standardised with the
streamed float64 statistics, which agree with the float32 layer norm over the whole clip to about 1e-6.
Streamed soxr resampling gives the same samples as resampling the whole clip at once.

``soundfile`` and ``soxr`` are optional dependencies (``pip install 'onepeace[audio]'``), imported on use.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from onepeace.config import AudioAdapterConfig
from onepeace.data import is_tensor
from onepeace.errors import InputError, require

if TYPE_CHECKING:
    import torch

    AudioInput = str | os.PathLike | bytes | np.ndarray | torch.Tensor

STANDARDIZE_EPS = 1e-5
BLOCK_FRAMES = 1 << 16
"""Frames decoded per read of a file (per channel)."""


@dataclass(frozen=True)
class AudioClip:
    """A mono clip at its target rate: its first samples, its length and its whole-clip statistics.

    ``wave`` float32 ``[K]`` holds the first ``K <= length`` samples. When ``K == length`` it is the whole clip and
    ``mean`` / ``var`` are ``None`` (standardisation computes them from ``wave``); otherwise they are the mean and the
    biased variance (float64) of all ``length`` samples, gathered while the file was streamed.
    """

    wave: np.ndarray
    length: int
    mean: float | None = None
    var: float | None = None


def _check_rate(rate: Any, what: str) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)):
        raise TypeError(f"{what} must be a number, got {type(rate).__name__}")
    if not math.isfinite(rate) or rate <= 0:
        raise InputError(f"{what} must be a positive number of samples per second, got {rate}")
    return rate


class _Moments:
    """Count, mean and sum of squared deviations of a stream of blocks (float64, Chan et al.'s pairwise update)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, block: np.ndarray) -> None:
        n = block.shape[0]
        if n == 0:
            return
        x = block.astype(np.float64)
        mean = float(x.mean())
        dev = x - mean
        total, delta = self.count + n, mean - self.mean
        self.m2 += float(np.dot(dev, dev)) + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.count = total


def _mono_blocks(handle: Any, name: str) -> Iterator[np.ndarray]:
    """Float32 mono blocks ``[n]`` of an open ``soundfile.SoundFile``, channels averaged as :func:`_to_mono` does."""
    while True:
        try:
            block = handle.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
        except Exception as exc:  # libsndfile reports damaged data with several exception types
            raise InputError(f"{name}: cannot decode audio (unreadable file or unsupported format: {exc})") from exc
        if block.shape[0] == 0:
            return
        yield _to_mono(block, name)


def _stream_encoded(source: Any, name: str, target_rate: float, keep: int | None) -> AudioClip:
    """Decode, mix down and resample a file in blocks; keep the first ``keep`` samples (all for ``None``)."""
    soundfile = require("soundfile", "audio")
    try:
        handle = soundfile.SoundFile(source)
    except Exception as exc:  # libsndfile reports unreadable data with several exception types
        raise InputError(f"{name}: cannot decode audio (unreadable file or unsupported format: {exc})") from exc
    with handle:
        rate = handle.samplerate
        stream = None
        if rate != target_rate:
            stream = require("soxr", "audio").ResampleStream(rate, target_rate, 1, dtype="float32", quality="HQ")
        head: list[np.ndarray] = []
        moments, frames, pending = _Moments(), 0, np.zeros(0, np.float32)

        def take(chunk: np.ndarray) -> None:  # a chunk of the output, in order
            if keep is None or moments.count < keep:
                head.append(chunk if keep is None else chunk[: keep - moments.count])
            moments.add(chunk)

        for block in _mono_blocks(handle, name):
            frames += block.shape[0]
            take(pending)  # one chunk late: the clip's exact length is known only at the end
            pending = block if stream is None else stream.resample_chunk(block, last=False)
    if frames == 0:
        raise InputError(f"{name}: audio clip is empty (0 samples)")
    if stream is not None:
        pending = np.concatenate([pending, stream.resample_chunk(np.zeros(0, np.float32), last=True)])
    length = frames if stream is None else int(np.ceil(frames * (float(target_rate) / rate)))
    need = max(length - moments.count, 0)  # librosa's length: cut, or pad with zeros
    take(np.pad(pending[:need], (0, need - min(need, pending.shape[0]))).astype(np.float32, copy=False))
    wave = np.concatenate(head) if head else np.zeros(0, np.float32)
    if wave.shape[0] == length:
        return AudioClip(wave, length)
    return AudioClip(wave, length, moments.mean, moments.m2 / moments.count)


def _from_array(src: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """User array -> float32 ``[N]`` or channels-last ``[N, C]``."""
    if is_tensor(src):
        import torch

        src = src.detach().cpu()
        if src.is_floating_point() and src.dtype != torch.float64:
            src = src.float()  # numpy has no bfloat16
        src = src.numpy()
    if not np.issubdtype(src.dtype, np.floating):
        raise InputError(f"{name}: audio samples must be floating point (e.g. float32 in [-1, 1]), got {src.dtype}")
    if src.ndim == 2 and src.shape[1] > src.shape[0]:
        raise InputError(
            f"{name}: 2-D audio must be channels-last [num_samples, channels], got shape {tuple(src.shape)} "
            "which looks channels-first; transpose it"
        )
    return np.asarray(src, dtype=np.float32)


def _to_mono(data: np.ndarray, name: str) -> np.ndarray:
    """``[N]`` or channels-last ``[N, C]`` -> float32 ``[N]`` (mean over channels); checks size and values."""
    if data.ndim == 2:
        if data.shape[1] == 0:
            raise InputError(f"{name}: audio has no channels")
        # librosa averages its [C, N] view (soundfile's [N, C] transposed) over axis 0; do the same
        data = data.T.mean(axis=0, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    elif data.ndim != 1:
        raise InputError(
            f"{name}: audio must be 1-D [num_samples] or 2-D [num_samples, channels], got shape {tuple(data.shape)}"
        )
    if data.shape[0] == 0:
        raise InputError(f"{name}: audio clip is empty (0 samples)")
    if not np.isfinite(data).all():
        raise InputError(f"{name}: audio contains NaN or infinite samples")
    return np.ascontiguousarray(data, dtype=np.float32)


def _resample(wave: np.ndarray, rate: float, target_rate: float) -> np.ndarray:
    """soxr HQ resampling, length fixed to ``ceil(N * target / rate)`` as librosa does (zero-pad or cut)."""
    soxr = require("soxr", "audio")
    out = soxr.resample(wave, rate, target_rate, quality="HQ").astype(np.float32, copy=False)
    length = int(np.ceil(wave.shape[0] * (float(target_rate) / rate)))
    if out.shape[0] > length:
        return out[:length]
    return np.pad(out, (0, length - out.shape[0])) if out.shape[0] < length else out


def load_audio(
    src: AudioInput,
    sample_rate: float | None = None,
    target_rate: float = 16000,
    name: str | None = None,
    *,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Load one clip as a mono float32 waveform ``[N]`` at ``target_rate``.

    Accepted: a file path (``str`` / ``os.PathLike``; anything soundfile reads: wav, flac, ogg,
    ...), encoded file ``bytes``, or a float numpy array / tensor, either 1-D ``[N]`` or 2-D
    **channels-last** ``[N, C]`` (the layout soundfile returns; a 2-D array with more columns than
    rows is rejected as channels-first). ``sample_rate`` is the rate of an array input (``None`` =
    already at ``target_rate``); files and bytes carry their own rate and ignore it. Channels are
    averaged, then the clip is resampled with soxr HQ if its rate differs from ``target_rate``
    (length ``ceil(N * target_rate / rate)``, as librosa does). ``name`` labels error messages.

    ``max_seconds`` returns only the first ``max_seconds`` seconds of a file or bytes, holding no more in
    memory; the official standardisation still needs the whole clip's statistics: take them from
    :func:`read_audio` and give its :class:`AudioClip` to :func:`prepare_waveform`.

    Raises :class:`InputError` (message names the input and the problem) or :class:`TypeError` for bad types.
    """
    return read_audio(src, sample_rate, target_rate, name, max_seconds=max_seconds).wave


def read_audio(
    src: AudioInput,
    sample_rate: float | None = None,
    target_rate: float = 16000,
    name: str | None = None,
    *,
    max_seconds: float | None = None,
) -> AudioClip:
    """:func:`load_audio` as an :class:`AudioClip`: with ``max_seconds``, a file or bytes is decoded in blocks
    (:data:`BLOCK_FRAMES` frames at its own rate, resampled as a stream) and only the first
    ``int(max_seconds * target_rate)`` samples are kept, with the mean and variance of the whole clip. Arrays are
    in memory already and are returned whole.
    """
    target_rate = _check_rate(target_rate, "target_rate")
    keep = None
    if max_seconds is not None:
        if isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float, np.integer, np.floating)):
            raise TypeError(f"max_seconds must be a number, got {type(max_seconds).__name__}")
        if not math.isfinite(max_seconds) or max_seconds <= 0:
            raise InputError(f"max_seconds must be a positive number of seconds, got {max_seconds}")
        keep = int(max_seconds * target_rate)
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        label = f"{name} ({path!r})" if name else f"audio {path!r}"
        if not Path(path).exists():
            raise InputError(f"{label}: audio file not found")
        if not Path(path).is_file():
            raise InputError(f"{label}: not a file")
        return _stream_encoded(path, label, target_rate, keep)
    if isinstance(src, (bytes, bytearray, memoryview)):
        label = name or "audio"
        if len(src) == 0:
            raise InputError(f"{label}: audio bytes are empty")
        return _stream_encoded(io.BytesIO(bytes(src)), label, target_rate, keep)
    if isinstance(src, np.ndarray) or is_tensor(src):
        label = name or "audio"
        rate = target_rate if sample_rate is None else _check_rate(sample_rate, f"{label}: sample_rate")
        wave = _to_mono(_from_array(src, label), label)
        wave = _resample(wave, rate, target_rate) if rate != target_rate else wave
        return AudioClip(wave, wave.shape[0])
    raise TypeError(
        f"{name or 'audio'}: unsupported audio type {type(src).__name__}; "
        "expected a path, bytes, numpy array or torch tensor"
    )


def _standardize(wave: np.ndarray, torch_free: bool) -> np.ndarray:
    """Zero mean, unit biased variance (eps 1e-5) over the whole clip ``[N]``."""
    if torch_free:  # float64 statistics; within ~1e-6 of the torch layer norm
        centred = wave.astype(np.float64) - wave.mean(dtype=np.float64)
        return (centred / np.sqrt(np.mean(centred * centred) + STANDARDIZE_EPS)).astype(np.float32)
    import torch
    import torch.nn.functional as F

    feats = torch.from_numpy(wave.copy())
    return F.layer_norm(feats, feats.shape, eps=STANDARDIZE_EPS).numpy()


def prepare_waveform(
    x: np.ndarray | AudioClip, cfg: AudioAdapterConfig, name: str = "waveform", *, torch_free: bool = False
) -> np.ndarray:
    """Official per-clip preparation of a mono ``cfg.sample_rate`` waveform ``[N]`` -> float32 ``[N']``.

    Order (checked against the official fixture): standardise over the whole clip (zero mean, biased
    variance, eps 1e-5, ``torch.nn.functional.layer_norm`` in float32, or numpy with ``torch_free``), then keep
    the first ``cfg.max_duration`` seconds, then tile a clip shorter than 1 s and cut it to exactly
    ``cfg.sample_rate`` samples. A silent clip gives zeros. An :class:`AudioClip` holding only the first part of a
    longer clip is standardised with its whole-clip statistics (float64), then cut.
    """
    if isinstance(x, AudioClip):
        if x.mean is None or x.var is None:
            x = x.wave
        else:
            width = int(cfg.max_duration * cfg.sample_rate)
            if x.wave.shape[0] < min(width, x.length):
                raise InputError(f"{name}: {x.wave.shape[0]} samples read, fewer than the {width} to keep")
            scale = 1.0 / math.sqrt(x.var + STANDARDIZE_EPS)
            return ((x.wave[:width].astype(np.float64) - x.mean) * scale).astype(np.float32)
    return audio_windows(x, cfg, name, torch_free=torch_free)[0]


def audio_windows(
    x: np.ndarray, cfg: AudioAdapterConfig, name: str = "waveform", *, torch_free: bool = False
) -> list[np.ndarray]:
    """Every part of a long clip, as windows of ``cfg.max_duration`` seconds: a list of float32 ``[N_w]``.

    The clip is standardised over its whole length as :func:`prepare_waveform` does; a clip no longer than one
    window gives exactly what :func:`prepare_waveform` gives. A longer clip of ``N`` samples gives
    ``k = ceil(N / W)`` windows of ``W`` samples whose starts are evenly spaced from 0 to ``N - W`` (rounded down),
    so the first window is the official one, the last ends at the clip's end, and every sample is in a window.
    """
    arr = np.asarray(x.detach().cpu() if is_tensor(x) else x)
    if arr.ndim != 1:
        raise InputError(f"{name}: expected a 1-D waveform [num_samples], got shape {tuple(arr.shape)}")
    feats = _standardize(_to_mono(arr, name), torch_free)
    width, total = int(cfg.max_duration * cfg.sample_rate), feats.shape[0]
    if total <= width:
        return [_at_least_one_second(feats, cfg)]
    count = math.ceil(total / width)
    starts = [(i * (total - width)) // (count - 1) for i in range(count)]
    return [feats[start : start + width] for start in starts]


def _at_least_one_second(feats: np.ndarray, cfg: AudioAdapterConfig) -> np.ndarray:
    """A clip shorter than one second tiled and cut to exactly ``cfg.sample_rate`` samples (official)."""
    one_second = int(cfg.sample_rate)
    if feats.shape[0] < one_second:
        feats = np.tile(feats, math.ceil(one_second / feats.shape[0]))[:one_second]
    return feats


def collate_audio(waves: Sequence[np.ndarray], cfg: AudioAdapterConfig) -> tuple[torch.FloatTensor, torch.BoolTensor]:
    """Batch prepared waveforms: ``(waveform [B, N_max] float32, padding_mask [B, T_max + 1] bool)``.

    Waveforms are right-padded with 0.0. Row ``i`` of the mask (True = pad) starts with ``T_i + 1`` False
    entries (cls + ``T_i = cfg.num_frames(len_i)`` frames) and is right-padded with True.
    """
    import torch

    waveform, padding_mask = collate_arrays(waves, cfg)
    return torch.from_numpy(waveform), torch.from_numpy(padding_mask)


def collate_arrays(waves: Sequence[np.ndarray], cfg: AudioAdapterConfig) -> tuple[np.ndarray, np.ndarray]:
    """:func:`collate_audio` as numpy arrays (float32 ``[B, N_max]``, bool ``[B, T_max + 1]``)."""
    arrays = [np.asarray(w.detach().cpu() if is_tensor(w) else w) for w in waves]
    if not arrays:
        raise InputError("no audio clips to collate: give at least one")
    frames = []
    for i, arr in enumerate(arrays):
        if arr.ndim != 1:
            raise InputError(f"audio {i}: expected a 1-D waveform [num_samples], got shape {tuple(arr.shape)}")
        num = cfg.num_frames(arr.shape[0])
        if num < 1:
            raise InputError(f"audio {i}: {arr.shape[0]} samples is too short for one feature frame")
        if num + 1 > cfg.max_rel_positions:
            raise InputError(
                f"audio {i}: {arr.shape[0]} samples give {num} frames, more than the model's "
                f"{cfg.max_rel_positions - 1}; shorten the clip"
            )
        frames.append(num)
    waveform = np.zeros((len(arrays), max(a.shape[0] for a in arrays)), dtype=np.float32)
    padding_mask = np.ones((len(arrays), max(frames) + 1), dtype=bool)
    for i, (arr, num) in enumerate(zip(arrays, frames, strict=True)):
        waveform[i, : arr.shape[0]] = arr
        padding_mask[i, : num + 1] = False
    return waveform, padding_mask


def preprocess_audio(
    clips: Sequence[AudioInput], cfg: AudioAdapterConfig | None = None, sample_rate: float | None = None
) -> tuple[torch.FloatTensor, torch.BoolTensor]:
    """Official API audio preprocessing of a batch: ``(waveform [B, N_max], padding_mask [B, T_max + 1])``.

    :func:`load_audio` (at ``cfg.sample_rate``; ``sample_rate`` applies to array inputs) ->
    :func:`prepare_waveform` -> :func:`collate_audio`. Errors name the failing clip (its path, or
    ``audio i``). ``cfg`` defaults to :class:`AudioAdapterConfig` ``()``.
    """
    import torch

    waveform, padding_mask = audio_arrays(clips, cfg, sample_rate)
    return torch.from_numpy(waveform), torch.from_numpy(padding_mask)


def audio_arrays(
    clips: Sequence[AudioInput],
    cfg: AudioAdapterConfig | None = None,
    sample_rate: float | None = None,
    *,
    torch_free: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`preprocess_audio` as numpy arrays; ``torch_free`` standardises with numpy (:func:`prepare_waveform`)."""
    cfg = AudioAdapterConfig() if cfg is None else cfg
    if sample_rate is not None:
        _check_rate(sample_rate, "sample_rate")
    if isinstance(clips, (str, os.PathLike, bytes, bytearray)):
        raise TypeError(f"clips must be a sequence of clips (e.g. a list), got a single {type(clips).__name__}")
    if (isinstance(clips, np.ndarray) or is_tensor(clips)) and clips.ndim < 2:
        raise TypeError("clips must be a sequence of clips; wrap a single waveform in a list")
    items = list(clips)
    if not items:
        raise InputError("clips is empty: give at least one audio clip")
    waves = []
    for i, clip in enumerate(items):
        label = f"audio {i}"
        read = read_audio(clip, sample_rate, cfg.sample_rate, label, max_seconds=cfg.max_duration)
        waves.append(prepare_waveform(read, cfg, name=label, torch_free=torch_free))
    return collate_arrays(waves, cfg)
