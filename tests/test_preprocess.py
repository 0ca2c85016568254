"""Image and audio preprocessing: official parity, accepted input kinds, and error messages for bad inputs."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import official
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from onepeace.config import AudioAdapterConfig
from onepeace.data.audio import collate_audio, load_audio, prepare_waveform, preprocess_audio
from onepeace.data.image import CLIP_MEAN, CLIP_STD, load_image, preprocess_images
from onepeace.errors import InputError

sf = pytest.importorskip("soundfile")
soxr = pytest.importorskip("soxr")

CFG = AudioAdapterConfig()


# ---------------------------------------------------------------------------------------------------- audio
def _raw_clips() -> list[torch.Tensor]:
    inputs = official.inputs()
    return [inputs[f"audio.raw_waveform_{i}"] for i in range(3)]


def _assert_matches_fixture(waveform: torch.Tensor, mask: torch.Tensor) -> None:
    inputs = official.inputs()
    assert torch.equal(waveform, inputs["audio.waveform"])
    assert torch.equal(mask, inputs["audio.padding_mask"])


def test_audio_arrays_match_official_fixture() -> None:
    clips = [c.numpy() for c in _raw_clips()]
    _assert_matches_fixture(*preprocess_audio(clips, CFG, sample_rate=16000))
    _assert_matches_fixture(*preprocess_audio(_raw_clips(), CFG))  # tensors, rate defaults to 16 kHz


def test_audio_float_wav_files_match_official_fixture(tmp_path: Path) -> None:
    paths = []
    for i, clip in enumerate(_raw_clips()):
        path = tmp_path / f"clip{i}.wav"
        sf.write(path, clip.numpy(), 16000, subtype="FLOAT")
        paths.append(path)
    _assert_matches_fixture(*preprocess_audio([str(p) for p in paths], CFG))
    _assert_matches_fixture(*preprocess_audio([p.read_bytes() for p in paths], CFG))


def test_audio_step_order_standardise_before_tiling() -> None:
    short = _raw_clips()[2]
    prepared = torch.from_numpy(prepare_waveform(short.numpy(), CFG))
    expected = F.layer_norm(short, short.shape).repeat(2)[:16000]
    assert torch.equal(prepared, expected)
    assert not torch.equal(prepared, F.layer_norm(short.repeat(2)[:16000], (16000,)))


def test_stereo_44k_is_resampled_to_mono_16k(tmp_path: Path) -> None:
    rate, seconds = 44100, 1.5
    t = np.arange(int(rate * seconds)) / rate
    left, right = np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 660 * t)
    stereo = np.stack([left, right], axis=1).astype(np.float32)
    wave = load_audio(stereo, sample_rate=rate)
    assert wave.dtype == np.float32 and wave.shape == (24000,)
    mono = stereo.T.mean(axis=0)
    assert np.array_equal(wave, soxr.resample(mono, rate, 16000, quality="HQ"))
    path = tmp_path / "stereo.flac"
    sf.write(path, stereo, rate, subtype="PCM_24")
    from_file = load_audio(path)
    assert from_file.shape == (24000,) and np.abs(from_file - wave).max() < 1e-4
    waveform, mask = preprocess_audio([path], CFG)
    assert waveform.shape == (1, 24000) and mask.shape == (1, CFG.num_frames(24000) + 1)


def test_resampled_length_is_rounded_up() -> None:
    wave = load_audio(np.zeros(44101, dtype=np.float32), sample_rate=44100)
    assert wave.shape == (16001,)


@pytest.mark.parametrize(("seconds", "frames"), [(1, 49), (5, 249), (10, 499), (15, 749), (20, 999)])
def test_frame_count_formula(seconds: int, frames: int) -> None:
    assert CFG.num_frames(seconds * 16000) == frames


def test_collate_pads_waveform_and_mask() -> None:
    waves = [np.ones(16000 * 5, np.float32), np.ones(16000, np.float32)]
    waveform, mask = collate_audio(waves, CFG)
    assert waveform.shape == (2, 80000) and mask.shape == (2, 250)
    assert mask[0].sum() == 0 and mask[1].tolist() == [False] * 50 + [True] * 200
    assert torch.count_nonzero(waveform[1, 16000:]) == 0


def test_long_clip_is_cut_to_15_seconds() -> None:
    clip = np.random.default_rng(0).standard_normal(20 * 16000).astype(np.float32)
    prepared = prepare_waveform(clip, CFG)
    assert prepared.shape == (15 * 16000,)
    full = F.layer_norm(torch.from_numpy(clip), (clip.shape[0],))  # standardised over the whole 20 s first
    assert torch.equal(torch.from_numpy(prepared), full[: 15 * 16000])
    _, mask = preprocess_audio([clip], CFG)
    assert mask.shape == (1, 750)


def test_silent_and_tiny_clips() -> None:
    silent = prepare_waveform(np.zeros(8000, np.float32), CFG)
    assert silent.shape == (16000,) and not np.isnan(silent).any() and not silent.any()
    tiny = prepare_waveform(np.array([0.5, -0.5, 0.25], np.float32), CFG)
    assert tiny.shape == (16000,) and np.isfinite(tiny).all()


def _wav_bytes(x: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("clip", "kwargs", "message"),
    [
        (np.zeros(0, np.float32), {}, "empty (0 samples)"),
        (np.array([0.1, np.nan, 0.2], np.float32), {}, "NaN or infinite"),
        (np.array([0.1, np.inf, 0.2], np.float32), {}, "NaN or infinite"),
        (np.zeros((4, 3, 2), np.float32), {}, "got shape (4, 3, 2)"),
        (np.zeros((2, 16000), np.float32), {}, "channels-first"),
        (np.zeros(100, np.int16), {}, "floating point"),
        (b"this is not audio at all" * 10, {}, "cannot decode audio"),
        (b"", {}, "bytes are empty"),
        (_wav_bytes(np.zeros(0, np.float32)), {}, "empty (0 samples)"),
    ],
)
def test_bad_audio_inputs(clip: object, kwargs: dict, message: str) -> None:
    with pytest.raises(InputError) as err:
        preprocess_audio([np.zeros(16000, np.float32), clip], CFG, **kwargs)
    assert "audio 1" in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("rate", [0, -16000, float("nan")])
def test_bad_sample_rate(rate: float) -> None:
    with pytest.raises(InputError, match="sample_rate must be a positive number"):
        preprocess_audio([np.zeros(100, np.float32)], CFG, sample_rate=rate)
    with pytest.raises(InputError, match="sample_rate must be a positive number"):
        load_audio(np.zeros(100, np.float32), sample_rate=rate)
    with pytest.raises(TypeError, match="sample_rate must be a number"):
        load_audio(np.zeros(100, np.float32), sample_rate="16k")


def test_bad_audio_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.wav"
    with pytest.raises(InputError, match="audio file not found") as err:
        load_audio(missing)
    assert str(missing) in str(err.value)
    garbage = tmp_path / "garbage.wav"
    garbage.write_text("not a wav file\n" * 20)
    with pytest.raises(InputError, match="cannot decode audio") as err:
        preprocess_audio([garbage], CFG)
    assert "garbage.wav" in str(err.value)
    with pytest.raises(InputError, match="not a file"):
        load_audio(tmp_path)


def test_bad_audio_types() -> None:
    with pytest.raises(TypeError, match="unsupported audio type int"):
        preprocess_audio([3], CFG)
    with pytest.raises(TypeError, match="sequence"):
        preprocess_audio("clip.wav", CFG)
    with pytest.raises(InputError, match="empty"):
        preprocess_audio([], CFG)
    with pytest.raises(InputError, match="too short"):
        collate_audio([np.zeros(100, np.float32)], CFG)


# ---------------------------------------------------------------------------------------------------- images
def _normalise_uint8(pixels: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 -> ``[3, H, W]`` like torchvision ToTensor + Normalize."""
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


def _random_pixels(h: int = 37, w: int = 53, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_solid_colour_is_hand_computable() -> None:
    colour = (200, 100, 50)
    out = preprocess_images([Image.new("RGB", (40, 30), colour)], size=16)
    assert out.shape == (1, 3, 16, 16) and out.dtype == torch.float32
    for c in range(3):
        # float32 arithmetic as torchvision's ToTensor + Normalize: (v / 255 - mean) / std
        v, mean, std = (torch.tensor(float(x)) for x in (colour[c], CLIP_MEAN[c], CLIP_STD[c]))
        expected = ((v / 255 - mean) / std).item()
        assert torch.equal(out[0, c], torch.full((16, 16), expected))
        assert math.isclose(expected, (colour[c] / 255 - CLIP_MEAN[c]) / CLIP_STD[c], rel_tol=1e-6)


def test_resize_matches_pil_bicubic() -> None:
    pixels = _random_pixels()
    resized = np.asarray(Image.fromarray(pixels).resize((32, 32), Image.BICUBIC))
    out = preprocess_images([pixels], size=32)
    assert torch.equal(out[0], _normalise_uint8(resized))


def test_all_input_kinds_agree(tmp_path: Path) -> None:
    pixels = _random_pixels()
    path = tmp_path / "img.png"
    Image.fromarray(pixels).save(path)
    chw = torch.from_numpy(pixels).permute(2, 0, 1)
    kinds = [
        str(path),
        path,
        path.read_bytes(),
        Image.open(path),
        Image.fromarray(pixels).convert("RGBA"),
        pixels,
        pixels / 255.0,
        pixels.astype(np.float32) / 255,
        chw,
        chw.float() / 255,
    ]
    out = preprocess_images(kinds, size=24)
    for i in range(1, len(kinds)):
        assert torch.equal(out[i], out[0]), f"input kind {i} differs"
    gray = pixels[:, :, 0]
    expected = preprocess_images([Image.fromarray(gray, mode="L")], size=24)
    assert torch.equal(preprocess_images([gray], size=24), expected)
    assert load_image(pixels).mode == "RGB"


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (b"\x00\x01garbage bytes that are no image" * 4, "not a readable image"),
        (b"", "bytes are empty"),
        (_png_bytes(_random_pixels(64, 64))[:300], "corrupt or truncated"),
        (_jpeg_bytes(_random_pixels(64, 64))[:400], "corrupt or truncated"),
        (np.zeros((8, 8, 4), np.uint8), "shape [H, W, 3] or [H, W], got (8, 8, 4)"),
        (np.zeros((8,), np.uint8), "got (8,)"),
        (np.zeros((8, 8, 3), np.int32), "dtype must be uint8 or float"),
        (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
        (np.full((8, 8, 3), 2.0, np.float32), "must lie in [0, 1]"),
        (torch.zeros(8, 8, 3), "tensor must have shape [3, H, W]"),
        (np.zeros((0, 8, 3), np.uint8), "image is empty"),
    ],
)
def test_bad_image_inputs(image: object, message: str) -> None:
    with pytest.raises(InputError) as err:
        preprocess_images([np.zeros((8, 8, 3), np.uint8), image], size=16)
    assert "image 1" in str(err.value) and message in str(err.value)


def test_bad_image_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jpg"
    with pytest.raises(InputError, match="image file not found") as err:
        preprocess_images([missing], size=16)
    assert "missing.jpg" in str(err.value) and "image 0" in str(err.value)
    fake = tmp_path / "notes.jpg"
    fake.write_text("just some text, not a JPEG\n")
    with pytest.raises(InputError, match="not a readable image") as err:
        load_image(fake)
    assert "notes.jpg" in str(err.value)
    with pytest.raises(InputError, match="empty"):
        preprocess_images([], size=16)
    with pytest.raises(TypeError, match="unsupported image type int"):
        preprocess_images([5], size=16)
    with pytest.raises(TypeError, match="wrap it in a list"):
        preprocess_images(str(fake), size=16)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert preprocess_images([_png_bytes(_random_pixels(100, 100))], size=8).shape == (1, 3, 8, 8)
    for side in (101, 300):  # above the limit (PIL warns) and above twice the limit (PIL raises)
        with pytest.raises(InputError, match="decompression bomb"):
            load_image(_png_bytes(_random_pixels(side, 100)))
