"""Loading and converting one tensor at a time from memory-mapped files: the handles read exactly what torch reads,
and (through ``benchmarks/load_4b.py`` on a 4-layer onepeace-base, 0.58 GB in fp32) the peak resident memory of a
fresh process stays within 1.15x the target weight bytes above its baseline."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import official
import pytest
import torch
from safetensors.torch import load_file

import onepeace
from onepeace.checkpoints import mapped
from onepeace.checkpoints.mapped import MappedTensor, open_safetensors, write_safetensors
from onepeace.checkpoints.official import official_state
from onepeace.checkpoints.pickle_io import open_official_checkpoint
from onepeace.errors import CheckpointError
from onepeace.model import OnePeaceModel
from onepeace.variants import get_variant

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "load_4b.py"
BOUND = 1.15


def _saved(tmp_path: Path, payload: object, name: str = "ck.pt") -> Path:
    path = tmp_path / name
    torch.save(payload, path)
    return path


def test_handles_read_what_torch_reads(tmp_path: Path, official_checkpoint: Path) -> None:
    handles, cfg = open_official_checkpoint(official_checkpoint)
    reference = torch.load(official_checkpoint, weights_only=False)["model"]
    assert cfg == official.checkpoint_meta()["cfg"]
    assert set(handles) == set(reference) and all(isinstance(h, MappedTensor) for h in handles.values())
    for key, handle in handles.items():
        assert torch.equal(handle.view(), reference[key]), key
        loaded = handle.load(torch.bfloat16)
        expected = reference[key].to(torch.bfloat16) if reference[key].is_floating_point() else reference[key]
        assert loaded.dtype == expected.dtype and torch.equal(loaded, expected), key


def test_strided_shared_and_chunked_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = torch.arange(24 * 5, dtype=torch.float32).reshape(24, 5)
    model = {"t": base.t(), "row": base[3], "all": base, "ints": torch.arange(7), "scalar": torch.tensor(2.5)}
    path = _saved(tmp_path, {"model": model})
    monkeypatch.setattr(mapped, "CHUNK_BYTES", 36)  # 9 floats per chunk: chunks end inside rows and pages
    handles, _ = open_official_checkpoint(path)
    for key, value in model.items():
        for dtype in (None, torch.float16):
            out = handles[key].load(dtype)
            want = value if dtype is None or not value.is_floating_point() else value.to(dtype)
            assert out.is_contiguous() and out.dtype == want.dtype and torch.equal(out, want), (key, dtype)
    assert handles["t"].stride == (1, 5) and handles["row"].offset == 15


def test_mapped_reader_refuses_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class RunsCode:
        def __reduce__(self):
            return (exec, ("open('PWNED', 'w').write('x')",))

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"model": {"x": torch.zeros(2)}, "extra_state": RunsCode()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil.pt: its pickle references builtins.exec"):
        open_official_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_compressed_archive_is_read_whole(tmp_path: Path) -> None:
    """A zip whose members are deflated cannot be viewed in place; it is read by torch.load instead."""
    stored = _saved(tmp_path, {"model": {"w": torch.randn(4, 3)}})
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(stored) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    handles, _ = open_official_checkpoint(deflated)
    assert isinstance(handles["w"], torch.Tensor)
    assert torch.equal(handles["w"], torch.load(stored)["model"]["w"])


def test_write_safetensors_streams_handles(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.tensor(1.5), "d": torch.zeros(0, 2)}
    src = _saved(tmp_path, {"model": tensors})
    handles, _ = open_official_checkpoint(src)
    out = tmp_path / "out.safetensors"
    write_safetensors(out, handles, dtype=torch.bfloat16, metadata={"format": "x"})
    back = load_file(out)
    assert set(back) == set(tensors)
    for key, value in tensors.items():
        want = value.to(torch.bfloat16) if value.is_floating_point() else value
        assert back[key].dtype == want.dtype and torch.equal(back[key], want), key
    reread, metadata = open_safetensors(out)
    assert metadata == {"format": "x"} and torch.equal(reread["a"].load(torch.float32), tensors["a"].bfloat16().float())


def test_truncated_safetensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"w": torch.randn(64, 64)})
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"w.safetensors: not a readable safetensors file \('w' does not match"):
        open_safetensors(path)


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    scratch = tmp_path_factory.mktemp("load_memory")
    report = scratch / "report.json"
    cmd = [sys.executable, str(SCRIPT), str(scratch), "--variant", "onepeace-base", "--layers", "4"]
    cmd += ["--dtypes", "fp32,bf16", "--embed", "text", "--convert", "bf16", "--threads", "1", "--keep"]
    proc = subprocess.run([*cmd, "--json", str(report)], capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(report.read_text()), scratch


@pytest.mark.slow
def test_peak_memory_within_bound(measured: tuple[dict, Path]) -> None:
    results, _ = measured
    cfg = get_variant("onepeace-base").replace(layers=4)
    with torch.device("meta"):
        params = sum(t.numel() for t in OnePeaceModel(cfg, init=False).state_dict().values())
    runs = results["runs"]
    assert runs["load fp32"]["weight_bytes"] == 4 * params
    assert runs["load bf16"]["weight_bytes"] == runs["load native bf16"]["weight_bytes"] == 2 * params
    for name, weights in (
        ("load fp32", 4 * params),
        ("load bf16", 2 * params),
        ("convert bf16", 2 * params),
        ("load native bf16", 2 * params),
    ):
        run = runs[name]
        extra = (run["peak_kb"] - run["baseline_kb"]) * 1024
        assert extra <= BOUND * weights, f"{name}: {extra / weights:.3f}x the weight bytes above the baseline"
    assert runs["convert bf16"]["file_bytes"] > 2 * params
    assert len(runs["load fp32"]["embed_text_s"]) == 1


@pytest.mark.slow
def test_measured_checkpoint_loads_exactly(measured: tuple[dict, Path]) -> None:
    """The random checkpoint the benchmark wrote, read by torch.load, equals what onepeace.load and convert give."""
    _, scratch = measured
    reference = torch.load(scratch / "one-peace.pt", weights_only=True, mmap=True)["model"]
    model = onepeace.load(scratch / "one-peace.pt").model
    ours = official_state(model.state_dict())
    assert set(ours) == set(reference)
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    converted = load_file(scratch / "native-bf16" / "model.safetensors")
    assert set(official_state(converted)) == set(reference)
    assert all(torch.equal(v, reference[k].to(torch.bfloat16)) for k, v in official_state(converted).items())


def test_shape_beyond_the_stored_bytes_is_refused(tmp_path: Path) -> None:
    """A handle whose shape claims more elements than its storage holds fails before allocating anything."""
    path = _saved(tmp_path, {"model": {"w": torch.zeros(4)}})
    handle = open_official_checkpoint(path)[0]["w"]
    forged = MappedTensor(handle.file, handle.start, handle.nbytes, handle.dtype, (10**12,), (1,))
    with pytest.raises(CheckpointError, match="does not fit its stored data"):
        forged.load(torch.bfloat16)


def test_int8_load_converts_each_layer_as_it_arrives(
    official_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``load(dtype="int8")`` quantises each fusion layer as soon as its weights are read (so the float model is never
    whole in memory) and gives exactly what quantising the loaded float model gives."""
    import onepeace.quantize as quantize
    from onepeace.quantize import int8_linears, quantize_int8

    seen: list[tuple[str, int]] = []
    real = quantize.quantize_linears

    def spy(module: torch.nn.Module) -> None:
        floats = sum(1 for t in int8_linears(module).values() if t is torch.nn.Linear)
        seen.append((type(module).__name__, floats))
        real(module)

    monkeypatch.setattr(quantize, "quantize_linears", spy)
    streamed = onepeace.load(official_checkpoint, dtype="int8")
    monkeypatch.setattr(quantize, "quantize_linears", real)
    assert [name for name, _ in seen[:2]] == ["FusionBlock", "FusionBlock"]  # the tiny model's two layers
    assert seen[0][1] == seen[1][1] > 0 and seen[2][0] == "OnePeaceModel"
    after = quantize_int8(onepeace.load(official_checkpoint))
    inputs = {
        "text": ["a dog on the grass"],
        "image": [np.zeros((40, 48, 3), np.uint8)],
        "audio": [np.ones(16000, np.float32)],
    }
    for modality, items in inputs.items():
        a = getattr(streamed.embed(**{modality: items}), modality)
        b = getattr(after.embed(**{modality: items}), modality)
        assert torch.equal(a, b), modality
