"""ONNX export (``onepeace export onnx``) and the torch-free runtime (``onepeace.onnx``) against eager PyTorch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from official import write_official_checkpoint
from PIL import Image

import onepeace
from onepeace.cli import main
from onepeace.errors import InputError
from onepeace.modality import Modality

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
soundfile = pytest.importorskip("soundfile")

TOLERANCE = 1e-4
TEXTS = ["a dog runs on the grass", "the sound of rain", "a" + " very long caption" * 40, "Hi!"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _write_media(folder: Path) -> tuple[list[Path], list[Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for i, (h, w) in enumerate([(40, 48), (120, 90), (64, 64)]):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        images.append(path)
    clips = []
    for i, (seconds, rate) in enumerate([(0.6, 16000), (2.3, 16000), (1.4, 44100), (3.1, 22050), (9.5, 16000)]):
        t = np.arange(int(seconds * rate)) / rate
        wave = 0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t) + 0.05 * rng.standard_normal(t.shape)
        path = folder / f"clip{i}.wav"
        soundfile.write(path, wave.astype(np.float32), rate)
        clips.append(path)
    return images, clips


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    return _write_media(tmp_path_factory.mktemp("media"))


# ----------------------------------------------------------------------------------------------- torch-free parts
def test_runtime_modules_import_without_torch(media: tuple[list[Path], list[Path]]) -> None:
    images, clips = media
    code = (
        "import sys\n"
        "import onepeace.onnx, onepeace.onnx.runtime, onepeace.onnx.manifest, onepeace.onnx.quantize\n"
        "from onepeace.data.tokenizer import tokenizer_for\n"
        "from onepeace.data.image import image_arrays\n"
        "from onepeace.data.audio import audio_arrays\n"
        "from onepeace.config import AudioAdapterConfig\n"
        "tokenizer_for(70).encode_batch(['a dog'])\n"
        f"image_arrays([{str(images[0])!r}], 64)\n"
        f"audio_arrays([{str(clips[2])!r}], AudioAdapterConfig(), torch_free=True)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert run.returncode == 0, run.stderr


def test_numpy_preprocessing_equals_the_torch_preprocessing(media: tuple[list[Path], list[Path]]) -> None:
    from onepeace.data.audio import audio_arrays, preprocess_audio
    from onepeace.data.image import image_arrays, preprocess_images
    from onepeace.data.tokenizer import default_tokenizer
    from onepeace.variants import get_variant

    images, clips = media
    tok = default_tokenizer()
    assert np.array_equal(tok.encode_batch(TEXTS), tok(TEXTS).numpy())
    assert tok.encode_batch(TEXTS).shape == (4, 71) and tok.encode_batch(TEXTS)[3].tolist()[-1] == 1
    assert np.array_equal(image_arrays(images, 96), preprocess_images(images, 96).numpy())
    cfg = get_variant("onepeace-small").audio
    wave, mask = audio_arrays(clips, cfg, torch_free=True)
    ref_wave, ref_mask = preprocess_audio(clips, cfg)
    assert np.array_equal(mask, ref_mask.numpy()) and wave.shape == tuple(ref_wave.shape)
    assert np.abs(wave - ref_wave.numpy()).max() < 2e-6  # numpy float64 statistics against torch's layer norm


def test_runtime_rejects_a_folder_without_manifest(tmp_path: Path) -> None:
    from onepeace.onnx import OnnxModel

    with pytest.raises(InputError, match="not an ONNX export, onepeace_onnx.json is missing"):
        OnnxModel(tmp_path)
    with pytest.raises(InputError, match="no such export directory"):
        OnnxModel(tmp_path / "missing")
    (tmp_path / "onepeace_onnx.json").write_text('{"format": "something else"}')
    with pytest.raises(InputError, match="not an onepeace ONNX manifest"):
        OnnxModel(tmp_path)


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_cli_bad_arguments_give_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _cli(["export", "onnx", str(tmp_path / "nope.pt"), str(tmp_path / "out")], capsys)
    assert code == 2 and err.startswith("onepeace: error: no such model file") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("x")
    code, err = _cli(["export", "onnx", "onepeace-tiny", str(tmp_path / "file")], capsys)
    assert code == 2 and err == f"onepeace: error: OUT_DIR {tmp_path / 'file'} exists and is not a directory\n"
    code, err = _cli(["export", "onnx", "onepeace-tiny", str(tmp_path / "o"), "--image-size", "100"], capsys)
    assert code == 2 and err == "onepeace: error: --image-size must be a positive multiple of 16, got 100\n"
    code, err = _cli(["export", "onnx", "onepeace-tiny", str(tmp_path / "o"), "--opset", "9"], capsys)
    assert code == 2 and err.strip().splitlines()[-1].endswith("opset must be between 17 and 23, got 9")
    code, err = _cli(["export", "tflite", "onepeace-tiny", str(tmp_path / "o")], capsys)
    assert code == 2 and "invalid choice: 'tflite'" in err


# ----------------------------------------------------------------------------------------------- exported graphs
def _token_batch(lengths: list[int], vocab: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tokens = np.ones((len(lengths), max(lengths)), dtype=np.int64)
    for row, n in enumerate(lengths):
        tokens[row, : n - 1] = rng.integers(4, vocab, n - 1)
        tokens[row, n - 1] = 2
    return tokens


def _audio_batch(lengths: list[int], cfg) -> tuple[np.ndarray, np.ndarray]:
    from onepeace.data.audio import collate_arrays

    waves = [np.random.default_rng(n).standard_normal(n).astype(np.float32) for n in lengths]
    return collate_arrays(waves, cfg)


def _max_diff(onnx_model, eager, modality: str, arrays: dict[str, np.ndarray]) -> float:
    with torch.inference_mode():
        expected = getattr(eager, f"encode_{modality}")(*(torch.from_numpy(a) for a in arrays.values())).numpy()
    got = onnx_model.encode(modality, **arrays)
    assert got.shape == expected.shape == (next(iter(arrays.values())).shape[0], eager.cfg.embed_dim)
    return float(np.abs(got - expected).max())


def _check_against_eager(onnx_dir: Path, eager) -> None:
    """Mixed batch sizes and lengths per modality; each audio clip of a mixed batch also equals the clip alone."""
    from onepeace.onnx import OnnxModel

    onnx_model = OnnxModel(onnx_dir, threads=1)
    vocab, size, acfg = eager.cfg.text.vocab_size, eager.cfg.image.image_size, eager.cfg.audio
    for seed, lengths in enumerate([[3], [2, 9, 30, 71], [5, 5, 40], [100, 7]]):
        assert _max_diff(onnx_model, eager, "text", {"tokens": _token_batch(lengths, vocab, seed)}) <= TOLERANCE
    for batch in (1, 2, 5):
        pixels = np.random.default_rng(batch).standard_normal((batch, 3, size, size)).astype(np.float32)
        assert _max_diff(onnx_model, eager, "image", {"pixels": pixels}) <= TOLERANCE
    rate = acfg.sample_rate
    for lengths in ([rate], [rate + 77, 3 * rate], [2 * rate, rate, int(2.6 * rate), rate + 400]):
        wave, mask = _audio_batch(lengths, acfg)
        assert _max_diff(onnx_model, eager, "audio", {"waveform": wave, "padding_mask": mask}) <= TOLERANCE
        mixed = onnx_model.encode("audio", waveform=wave, padding_mask=mask)
        for i, n in enumerate(lengths):
            alone = onnx_model.encode("audio", **dict(zip(("waveform", "padding_mask"), _audio_batch([n], acfg))))
            assert np.abs(alone[0] - mixed[i]).max() <= 1e-5


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from onepeace.onnx import export_onnx

    root = tmp_path_factory.mktemp("tiny_onnx")
    checkpoint = write_official_checkpoint(root / "checkpoint.pt")
    export_onnx(checkpoint, root / "onnx")
    return checkpoint, root / "onnx"


@pytest.mark.slow
def test_tiny_fixture_export_matches_eager(tiny_export: tuple[Path, Path]) -> None:
    checkpoint, onnx_dir = tiny_export
    manifest = json.loads((onnx_dir / "onepeace_onnx.json").read_text())
    assert manifest["embed_dim"] == 64 and manifest["image_size"] == 64 and manifest["opset"] == 18
    assert manifest["max_text_tokens"] == 70 and manifest["audio"]["batch_invariant"] is True
    assert manifest["onepeace_version"] == onepeace.__version__
    assert set(manifest["checks"]) == {"text", "image", "audio"}
    assert max(manifest["checks"].values()) <= TOLERANCE
    _check_against_eager(onnx_dir, onepeace.load(checkpoint).model)


@pytest.mark.slow
def test_exported_graphs_have_named_dynamic_dims(tiny_export: tuple[Path, Path]) -> None:
    import onnx

    _, onnx_dir = tiny_export
    dims = {}
    for modality in Modality:
        graph = onnx.load(str(onnx_dir / f"{modality.value}.onnx"), load_external_data=False).graph
        for value in [*graph.input, *graph.output]:
            dims[value.name] = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    assert dims["tokens"] == ["batch", "tokens"]
    assert dims["pixels"] == ["batch", 3, 64, 64]
    assert dims["waveform"] == ["batch", "samples"] and dims["padding_mask"] == ["batch", "frames"]
    assert dims["normalized_embedding"] == ["batch", 64]


@pytest.fixture(scope="module")
def small_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small_onnx") / "onnx"
    run = subprocess.run(
        [sys.executable, "-m", "onepeace", "export", "onnx", "onepeace-small", str(out), "--int8"],
        capture_output=True,
        text=True,
        timeout=1200,
        env=ENV,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    for name in ("text.onnx", "image.onnx", "audio.onnx", "text.int8.onnx", "onepeace_onnx.json"):
        assert f"wrote {out / name} (" in run.stdout
    assert run.stdout.count("checked ") == 3
    return out


@pytest.mark.slow
def test_small_export_matches_eager(small_export: Path) -> None:
    _check_against_eager(small_export, onepeace.load("onepeace-small").model)


@pytest.mark.slow
def test_runtime_embeds_raw_files_like_eager_without_torch(
    small_export: Path, media: tuple[list[Path], list[Path]], tmp_path: Path
) -> None:
    images, clips = media
    code = (
        "import sys, numpy as np\n"
        "from onepeace.onnx import OnnxModel\n"
        f"m = OnnxModel({str(small_export)!r}, threads=1)\n"
        f"e = m.embed(text={TEXTS!r}, image={[str(p) for p in images]!r}, audio={[str(p) for p in clips]!r},"
        " batch_size=3)\n"
        f"w = m.embed(audio={[str(p) for p in clips]!r}, batch_size=2, long_audio='windows')\n"
        f"np.savez({str(tmp_path / 'out.npz')!r}, text=e.text, image=e.image, audio=e.audio, windows=w.audio)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV)
    assert run.returncode == 0, run.stderr[-2000:]
    got = np.load(tmp_path / "out.npz")
    eager = onepeace.load("onepeace-small").embed(text=TEXTS, image=images, audio=clips, batch_size=3)
    for modality in ("text", "image", "audio"):
        expected = getattr(eager, modality).numpy()
        assert got[modality].shape == expected.shape
        assert np.abs(got[modality] - expected).max() <= TOLERANCE, modality
    windows = onepeace.load("onepeace-small").embed(audio=clips, batch_size=2, long_audio="windows").audio.numpy()
    assert np.abs(got["windows"] - windows).max() <= TOLERANCE  # the 9.5 s clip is pooled over 3 windows of 4 s
    assert np.abs(got["windows"][:4] - got["audio"][:4]).max() <= TOLERANCE  # shorter clips: one window
    assert np.abs(got["windows"][4] - got["audio"][4]).max() > 1e-3  # pooling changed the long clip's vector


@pytest.mark.slow
def test_int8_graphs_stay_close_to_eager(small_export: Path, media: tuple[list[Path], list[Path]]) -> None:
    from onepeace.onnx import OnnxModel

    images, clips = media
    int8 = OnnxModel(small_export, threads=1, variant="int8").embed(text=TEXTS, image=images, audio=clips)
    eager = onepeace.load("onepeace-small").embed(text=TEXTS, image=images, audio=clips)
    for modality in ("text", "image", "audio"):
        cosine = (getattr(int8, modality) * getattr(eager, modality).numpy()).sum(-1)
        assert cosine.min() >= 0.99, (modality, cosine)


def test_encode_rejects_wrong_inputs(tmp_path: Path) -> None:
    from onepeace.onnx.manifest import Manifest
    from onepeace.onnx.runtime import OnnxModel
    from onepeace.variants import get_variant

    manifest = Manifest.build(get_variant("onepeace-tiny"), 18, "onepeace-tiny", {})
    import dataclasses

    (tmp_path / "onepeace_onnx.json").write_text(json.dumps(dataclasses.asdict(manifest)))
    model = OnnxModel(tmp_path)
    with pytest.raises(InputError, match="audio takes waveform, padding_mask; got waveform"):
        model.encode("audio", waveform=np.zeros((1, 16000), np.float32))
    with pytest.raises(InputError, match="text.onnx: graph file is missing"):
        model.encode("text", tokens=np.ones((1, 3), np.int64))
    with pytest.raises(InputError, match="text 1 is empty"):
        model.embed(text=["a dog", "  "])
    with pytest.raises(InputError, match="give at least one of"):
        model.embed()
