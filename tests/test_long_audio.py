"""Long audio in windows (issue [inference] item 6): every part of a long clip is embedded and the windows pooled."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import onepeace
from onepeace.cli import main
from onepeace.config import AudioAdapterConfig
from onepeace.data.audio import audio_windows, collate_audio, prepare_waveform

soundfile = pytest.importorskip("soundfile")

RATE = 16000
CFG = AudioAdapterConfig()  # 15 s windows


def _clip(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    return (0.3 * np.sin(np.arange(n) * rng.uniform(0.02, 0.2)) + 0.1 * rng.standard_normal(n)).astype(np.float32)


def test_window_starts_by_hand() -> None:
    wave = _clip(31.0)
    windows = audio_windows(wave, CFG)
    # k = ceil(31 / 15) = 3 windows of 15 s, starts evenly spaced over 0 .. 16 s: 0, 8 s, 16 s
    assert [w.shape[0] for w in windows] == [15 * RATE] * 3
    whole = prepare_waveform(wave, CFG.__class__(max_duration=31.0))  # the whole clip, standardised once
    for window, start in zip(windows, (0, 8 * RATE, 16 * RATE), strict=True):
        np.testing.assert_array_equal(window, whole[start : start + 15 * RATE])
    np.testing.assert_array_equal(windows[0], prepare_waveform(wave, CFG))  # the first window is the official one
    assert windows[-1][-1] == whole[-1]  # the last window ends at the clip's end


@pytest.mark.parametrize("seconds", [0.4, 3.0, 15.0])
def test_clip_of_one_window_or_less_is_the_official_preparation(seconds: float) -> None:
    wave = _clip(seconds)
    windows = audio_windows(wave, CFG)
    assert len(windows) == 1
    np.testing.assert_array_equal(windows[0], prepare_waveform(wave, CFG))


def test_one_sample_past_a_window_gives_two_windows() -> None:
    wave = _clip(15.0)
    wave = np.concatenate([wave, wave[:1]])
    first, last = audio_windows(wave, CFG)
    assert first.shape == last.shape == (15 * RATE,)
    np.testing.assert_array_equal(last[:-1], first[1:])  # starts 0 and 1: shifted by one sample


@pytest.fixture(scope="module")
def small() -> onepeace.OnePeace:
    return onepeace.load("onepeace-small")  # 4 s windows


def test_pooled_embedding_is_the_renormalised_mean_of_its_windows(small) -> None:
    cfg = small.cfg.audio
    long, short = _clip(10.5, 1), _clip(2.5, 2)
    got = small.embed(audio=[long, short], long_audio="windows").audio
    windows = audio_windows(long, cfg)
    assert len(windows) == 3
    each = torch.cat([small.encode_audio(*collate_audio([w], cfg)) for w in windows])
    want = F.normalize(each.mean(0), dim=-1)
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], small.embed(audio=[short]).audio[0], atol=1e-5, rtol=0)
    first = small.embed(audio=[long]).audio[0]
    assert float(got[0] @ first) < 0.9999  # the later windows count
    for batch_size in (1, 2):
        again = small.embed(audio=[long, short], long_audio="windows", batch_size=batch_size).audio
        torch.testing.assert_close(again, got, atol=1e-5, rtol=0)


def test_model_default_and_bad_values(small) -> None:
    long = _clip(9.0, 3)
    model = onepeace.OnePeace(small.model, long_audio="windows")
    torch.testing.assert_close(model.embed(audio=long).audio, small.embed(audio=long, long_audio="windows").audio)
    with pytest.raises(ValueError, match="long_audio must be one of first, windows"):
        small.embed(audio=long, long_audio="all")


def test_cli_long_audio_windows(small, tmp_path: Path) -> None:
    path = tmp_path / "long.wav"
    soundfile.write(path, _clip(9.0, 4), RATE, subtype="FLOAT")
    for mode in ("first", "windows"):
        argv = ["embed", str(path), "--long-audio", mode, "--out", str(tmp_path / mode), "--quiet"]
        assert main(argv) == 0
        want = small.embed(audio=[str(path)], long_audio=mode).audio.numpy()
        np.testing.assert_allclose(np.load(tmp_path / f"{mode}.npy"), want, atol=1e-5)


def test_index_build_long_audio_windows(small, tmp_path: Path) -> None:
    from onepeace.search.index import EmbeddingIndex

    (tmp_path / "media").mkdir()
    path = tmp_path / "media" / "long.wav"
    soundfile.write(path, _clip(9.0, 5), RATE, subtype="FLOAT")
    argv = ["index", "build", "--input", str(tmp_path / "media"), "--out", str(tmp_path / "idx"), "--quiet"]
    assert main([*argv, "--long-audio", "windows"]) == 0
    want = small.embed(audio=[str(path)], long_audio="windows").audio[0].numpy()
    with EmbeddingIndex.open(tmp_path / "idx") as index:
        top = index.search(want, k=1)[0]
    assert Path(top.source).name == "long.wav" and top.score >= 1 - 1e-5
