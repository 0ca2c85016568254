"""Media hardening (issue [hardening] items 8, 14 and the CLI half of 19): high-bit-depth and transparent images,
bounded-memory audio reads, and library warnings kept out of one-line CLI errors."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import onepeace
from onepeace.config import AudioAdapterConfig
from onepeace.data import audio
from onepeace.data.audio import audio_arrays, load_audio, preprocess_audio
from onepeace.data.image import load_image
from onepeace.errors import InputError

soundfile = pytest.importorskip("soundfile")
soxr = pytest.importorskip("soxr")

CFG = AudioAdapterConfig()  # 16 kHz, 15 s kept
TESTS = Path(__file__).parent


def _python_json(script: str, *args: str) -> Any:
    """Run ``script`` in a fresh interpreter (one thread) and parse the JSON it prints last."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- item 8: images
def _png16(arr: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit colour): ``arr`` uint16 ``[H, W]`` or ``[H, W, C]``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    height, width = arr.shape[:2]
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _gray16(height: int = 48, width: int = 40) -> np.ndarray:
    """A 16-bit gradient with noise in the low byte, so that the low 8 bits carry real detail."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 65535, height * width).reshape(height, width)
    return np.clip(ramp + rng.integers(-300, 300, ramp.shape), 0, 65535).astype(np.uint16)


def test_item8_16bit_png_embeds_like_its_8bit_version(converted_dir: Path, tmp_path: Path) -> None:
    """Item 8: a 16-bit grey PNG (PIL mode I;16) is scaled to 8 bits, not clipped to white."""
    gray = _gray16()
    p16, p8, rgb16 = tmp_path / "g16.png", tmp_path / "g8.png", tmp_path / "rgb16.png"
    p16.write_bytes(_png16(gray, 0))
    rgb16.write_bytes(_png16(np.stack([gray] * 3, axis=-1), 2))
    # the 8-bit version another tool would write: the nearest of 256 levels
    Image.fromarray(np.rint(gray / 257.0).astype(np.uint8), "L").save(p8)
    assert Image.open(p16).mode == "I;16"

    pixels = np.asarray(load_image(p16))
    expected = (gray >> 8).astype(np.uint8)  # by hand: the high byte, as PIL reads a 16-bit RGB PNG
    assert pixels.dtype == np.uint8 and pixels.shape == (*gray.shape, 3)
    np.testing.assert_array_equal(pixels, np.stack([expected] * 3, axis=-1))
    np.testing.assert_array_equal(pixels, np.asarray(load_image(rgb16)))  # same picture stored as RGB
    assert (pixels == 255).mean() < 0.01

    model = onepeace.load(converted_dir)
    emb = model.embed(image=[str(p16), str(p8), str(rgb16)]).image.float()
    assert F.cosine_similarity(emb[0], emb[1], dim=0) > 0.99
    assert F.cosine_similarity(emb[0], emb[2], dim=0) > 0.9999


def test_item8_high_bit_depth_modes() -> None:
    """Item 8: I;16B, I (16-bit values) and F ([0, 1] or PIL's [0, 255] scale) become the right 8-bit RGB."""
    values = np.array([[0, 255, 256, 4660], [32768, 40000, 65280, 65535]], dtype=np.uint16)
    by_hand = np.array([[0, 0, 1, 18], [128, 156, 255, 255]], dtype=np.uint8)  # v >> 8
    big_endian = Image.frombytes("I;16B", (4, 2), values.astype(">u2").tobytes())
    as_int32 = Image.fromarray(values.astype(np.int32), "I")
    for img in (big_endian, as_int32):
        np.testing.assert_array_equal(np.asarray(load_image(img))[..., 0], by_hand)

    unit = np.array([[0.0, 0.5, 0.25, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(
        np.asarray(load_image(Image.fromarray(unit, "F")))[..., 1], [[0, 128, 64, 255]]
    )  # rint(x * 255): 127.5 rounds to 128 (half to even), 63.75 to 64
    scale255 = np.array([[0.0, 3.0, 200.4, 255.0]], dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(scale255, "F")))[..., 2], [[0, 3, 200, 255]])
    with pytest.raises(InputError, match=r"float image.*range"):
        load_image(Image.fromarray(np.array([[0.0, 300.0]], dtype=np.float32), "F"))
    with pytest.raises(InputError, match="NaN"):
        load_image(Image.fromarray(np.array([[0.0, np.nan]], dtype=np.float32), "F"))


def _palette_image() -> Image.Image:
    index = np.array([[0, 1, 2, 1]], dtype=np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette([10, 20, 30, 200, 0, 0, 0, 250, 5] + [0] * (768 - 9))
    return img


def test_item8_alpha_and_palette_transparency(tmp_path: Path) -> None:
    """Item 8: P with byte transparency, PA and LA keep their colours and drop alpha as RGBA does, without warnings."""
    colours = np.array([[[10, 20, 30], [200, 0, 0], [0, 250, 5], [200, 0, 0]]], dtype=np.uint8)
    path = tmp_path / "pal.png"
    _palette_image().save(path, transparency=bytes([0, 128, 255]))
    assert isinstance(Image.open(path).info["transparency"], bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's "Palette images with Transparency expressed in bytes" warning
        np.testing.assert_array_equal(np.asarray(load_image(path)), colours)
        np.testing.assert_array_equal(np.asarray(load_image(path.read_bytes())), colours)
        pa = _palette_image().convert("PA")
        np.testing.assert_array_equal(np.asarray(load_image(pa)), colours)
        la = Image.fromarray(np.array([[[7, 0], [99, 255]]], dtype=np.uint8), "LA")
        np.testing.assert_array_equal(np.asarray(load_image(la)), [[[7, 7, 7], [99, 99, 99]]])
        rgba = np.array([[[1, 2, 3, 0], [4, 5, 6, 255]]], dtype=np.uint8)
        np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(rgba, "RGBA"))), rgba[..., :3])


# ------------------------------------------------------------------------------------------- item 14: audio
def _signal(seconds: float, rate: int, channels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    tone = 0.3 * np.sin(2 * np.pi * 330 * t) * (1 + np.linspace(0, 1, n))  # louder later: whole-clip stats matter
    return (tone[:, None] + 0.05 * rng.standard_normal((n, channels)) + 0.02).astype(np.float32)


def _whole_clip_reference(path: Path) -> np.ndarray:
    """Today's official preprocessing by hand: decode all, mean channels, soxr HQ, layer norm, first 15 s."""
    data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    mono = data.T.mean(axis=0, dtype=np.float32)
    wave = soxr.resample(mono, rate, 16000, quality="HQ").astype(np.float32)
    length = int(np.ceil(mono.shape[0] * 16000 / rate))
    wave = np.pad(wave[:length], (0, max(0, length - wave.shape[0])))
    feats = torch.from_numpy(wave)
    return F.layer_norm(feats, feats.shape, eps=1e-5).numpy()[: 15 * 16000]


@pytest.mark.parametrize(("rate", "channels", "fmt"), [(44100, 2, "FLAC"), (16000, 1, "WAV"), (22050, 3, "WAV")])
def test_item14_long_file_read_in_blocks_matches_whole_clip(tmp_path: Path, rate: int, channels: int, fmt: str) -> None:
    """Item 14: only the first 15 s are kept, the statistics still come from the whole file (streamed)."""
    path = tmp_path / f"clip.{fmt.lower()}"
    soundfile.write(path, _signal(41.3, rate, channels), rate, format=fmt, subtype="PCM_24")
    clip = audio.read_audio(str(path), target_rate=16000, max_seconds=15.0)
    assert clip.wave.shape == (15 * 16000,) and clip.length == int(np.ceil(int(41.3 * rate) * 16000 / rate))
    whole = load_audio(str(path))
    np.testing.assert_array_equal(clip.wave, whole[: 15 * 16000])  # streamed resampling is bit-identical
    assert clip.mean == pytest.approx(float(whole.astype(np.float64).mean()), rel=1e-12, abs=1e-12)
    assert clip.var == pytest.approx(float(whole.astype(np.float64).var()), rel=1e-12)

    reference = _whole_clip_reference(path)
    waveform, mask = preprocess_audio([path], CFG)
    assert waveform.shape == (1, 15 * 16000) and not mask.any()
    np.testing.assert_allclose(waveform[0].numpy(), reference, rtol=0, atol=2e-6)
    torch_free, _ = audio_arrays([path.read_bytes()], CFG, torch_free=True)
    np.testing.assert_allclose(torch_free[0], reference, rtol=0, atol=2e-6)


def test_item14_short_file_unchanged(tmp_path: Path) -> None:
    """Item 14: a file no longer than 15 s is standardised exactly as before (bit-identical)."""
    path = tmp_path / "short.flac"
    soundfile.write(path, _signal(9.7, 44100, 2), 44100, subtype="PCM_24")
    waveform, _ = preprocess_audio([path], CFG)
    np.testing.assert_array_equal(waveform[0].numpy(), _whole_clip_reference(path))
    clip = audio.read_audio(str(path), max_seconds=15.0)
    assert clip.length == clip.wave.shape[0]


def _two_hour_flac(path: Path) -> None:
    """Two hours at 16 kHz: a 20 s tone, then silence with a 1 s tone every ten minutes (a small FLAC)."""
    rate, minute = 16000, 16000 * 60
    tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(minute) / rate)).astype(np.float32)
    first, beep = tone.copy(), tone.copy()
    first[20 * rate :] = 0.0
    beep[rate:] = 0.0
    silence = np.zeros(minute, dtype=np.float32)
    with soundfile.SoundFile(path, "w", rate, 1, format="FLAC", subtype="PCM_16") as out:
        for m in range(120):
            out.write(first if m == 0 else beep if m % 10 == 0 else silence)


_PEAK_SCRIPT = """
import json, resource, sys
import numpy as np, onepeace
model = onepeace.load(sys.argv[1])
model.embed(audio=[np.zeros(16000 * 20, np.float32)])  # warm up: imports, first forward
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
emb = model.embed(audio=[sys.argv[2]]).audio
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_mib": before / 1024, "after_mib": after / 1024, "norm": float(emb.norm())}))
"""


@pytest.mark.slow
def test_item14_two_hour_flac_peak_memory(converted_dir: Path, tmp_path: Path) -> None:
    """Item 14: embedding a 2-hour FLAC through the API grows peak RSS by < 150 MiB (whole decode: about 1.3 GiB)."""
    path = tmp_path / "two_hours.flac"
    _two_hour_flac(path)
    assert path.stat().st_size < 1_000_000
    peak = _python_json(_PEAK_SCRIPT, str(converted_dir), str(path))
    size = path.stat().st_size
    print(f"2-hour FLAC ({size:,} bytes): peak RSS {peak['before_mib']:.0f} -> {peak['after_mib']:.0f} MiB")
    assert peak["after_mib"] - peak["before_mib"] < 150
    assert peak["norm"] == pytest.approx(1.0, abs=1e-4)


# ------------------------------------------------------------------------------------ item 19: CLI warnings
_CLI_SCRIPT = """
import contextlib, io, json, sys
import torch
from onepeace import cli
from onepeace.cli import main

def warns_then_fails(args):
    torch.nn.init.kaiming_uniform_(torch.empty(0, 3))  # torch: "Initializing zero-element tensors is a no-op"
    raise ValueError("the command failed")

results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    if argv[0] == "patched":
        cli._info = warns_then_fails
        argv = argv[1:]
    with contextlib.redirect_stderr(err):
        code = main(argv)
    results.append({"code": code, "err": err.getvalue()})
print(json.dumps(results))
"""


def _zero_ffn_model(converted_dir: Path, tmp_path: Path) -> Path:
    """A model folder whose config asks for ffn_dim 0: building it makes torch warn about zero-element tensors."""
    folder = tmp_path / "zero_ffn"
    folder.mkdir()
    for item in converted_dir.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["config"]["ffn_dim"] = 0
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_item19_library_warnings_stay_out_of_cli_errors(converted_dir: Path, tmp_path: Path) -> None:
    """Item 19 (second half): torch and PIL warnings add no lines to a one-line CLI error; --debug shows them."""
    palette = tmp_path / "pal.png"
    _palette_image().save(palette, transparency=bytes([0, 128, 255]))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    zero_ffn = str(_zero_ffn_model(converted_dir, tmp_path))
    cases = [
        ["embed", "--model", zero_ffn, "--text", "hi", "--out", str(tmp_path / "o")],
        ["embed", "--model", str(converted_dir), str(palette), "--out", str(blocker / "out")],
        ["patched", "info", "onepeace-tiny"],
        ["patched", "--debug", "info", "onepeace-tiny"],
    ]
    results = _python_json(_CLI_SCRIPT, json.dumps(cases))
    for result in results[:3]:
        assert result["code"] == 2
        lines = result["err"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("onepeace: error: "), result["err"]
    assert results[2]["err"] == "onepeace: error: the command failed\n"
    debug = results[3]["err"]
    assert "Initializing zero-element tensors is a no-op" in debug and "Traceback" in debug


def test_item19_project_warnings_are_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Item 19: the CLI shows the project's own warnings as one ``onepeace: warning:`` line, drops libraries' ones."""
    from onepeace import cli, pretrained

    monkeypatch.setattr(pretrained, "shipped_weights", lambda name: None)
    assert cli.main(["embed", "--text", "hi", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "onepeace: warning: this installation has no pretrained weights for onepeace-small; it is randomly initialised"
    ]
    from onepeace.errors import OnePeaceWarning

    cli._show_warning(UserWarning("zero-element"), UserWarning, torch.nn.init.__file__, 1)
    cli._show_warning(DeprecationWarning("palette"), DeprecationWarning, Image.__file__, 1)
    cli._show_warning(OnePeaceWarning("a\n  b"), OnePeaceWarning, cli.__file__, 1)
    assert capsys.readouterr().err == "onepeace: warning: a b\n"
