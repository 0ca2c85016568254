"""The ``onepeace`` command line: embed, convert, info and error handling."""

from __future__ import annotations

import json
import os
import pickle
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
from onepeace.info import parameter_breakdown
from onepeace.model import OnePeaceModel
from onepeace.variants import VARIANTS

soundfile = pytest.importorskip("soundfile")

TINY_TOTAL = "3,652,993"
TEXTS = ["a dog runs on the grass", "the sound of rain"]


def _write_media(folder: Path) -> None:
    (folder / "sub").mkdir(parents=True)
    gradient = np.linspace(0, 255, 48 * 40 * 3).reshape(40, 48, 3).astype(np.uint8)
    Image.fromarray(gradient).save(folder / "a.png")
    Image.fromarray(gradient[::-1].copy()).save(folder / "sub" / "b.jpg", quality=90)
    t = np.arange(16000 * 2) / 16000
    soundfile.write(folder / "c.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    rng = np.random.default_rng(0)
    stereo = (0.1 * rng.standard_normal((44100, 2))).astype(np.float32)
    soundfile.write(folder / "sub" / "d.wav", stereo, 44100)
    tone = (0.2 * np.sin(2 * np.pi * 220 * np.arange(24000) / 16000)).astype(np.float32)
    soundfile.write(folder / "e.ogg", tone, 16000, format="OGG", subtype="VORBIS")
    (folder / "t.txt").write_text(f"{TEXTS[0]}\n\n{TEXTS[1]}\n", encoding="utf-8")
    (folder / "notes.md").write_text("ignored\n")


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("media") / "data"
    _write_media(folder)
    return folder


@pytest.fixture(scope="module")
def official_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_official_checkpoint(tmp_path_factory.mktemp("official") / "checkpoint.pt")


@pytest.fixture(scope="module")
def converted(official_pt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "tiny"
    assert main(["convert", str(official_pt), str(out)]) == 0
    return out


def _read(prefix: Path) -> tuple[np.ndarray, list[dict]]:
    rows = [json.loads(line) for line in Path(f"{prefix}.jsonl").read_text().splitlines()]
    return np.load(f"{prefix}.npy"), rows


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("onepeace: error: ")
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------------------------- help
def test_module_help_runs_without_torch() -> None:
    run = subprocess.run([sys.executable, "-m", "onepeace", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "embed" in run.stdout and "convert" in run.stdout and "info" in run.stdout
    code = "import sys; from onepeace.cli import main; main(['embed', '--help']); print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip().endswith("False"), run.stdout + run.stderr


@pytest.mark.parametrize("command", ["embed", "convert", "info"])
def test_subcommand_help(command: str, capsys: pytest.CaptureFixture) -> None:
    assert main([command, "--help"]) == 0
    assert f"usage: onepeace {command}" in capsys.readouterr().out


def test_usage_error_returns_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["embed", "--batch-size", "0", "x.png"]) == 2
    assert main([]) == 2


# ----------------------------------------------------------------------------------------------- info
def test_info_4b_matches_spec(capsys: pytest.CaptureFixture) -> None:
    assert main(["info", "onepeace-4b"]) == 0
    out = capsys.readouterr().out
    for number in [
        "3,884,740,545",
        "3,390,816",
        "19,040,816",
        "78,008,880",
        "1,133,015,040",
        "377,794,560",
        "368,640",
        "9,216",
        "7,082,497",
        "1,514,572,128",
    ]:
        assert number in out, number
    assert "float32" in out and "bfloat16" in out and "GiB" in out


def test_parameter_breakdown_4b() -> None:
    cfg = VARIANTS["onepeace-4b"]
    with torch.device("meta"):
        model = OnePeaceModel(cfg, init=False)
    counts = parameter_breakdown(model, cfg)
    mods, shared = counts["modalities"], counts["shared"]
    assert counts["total"] == 3_884_740_545 and not counts["other"]
    assert (mods["image"]["adapter"], mods["audio"]["adapter"], mods["text"]["adapter"]) == (
        3_390_816,
        19_040_816,
        78_008_880,
    )
    assert all(mods[m]["ffn"] == 1_133_015_040 for m in mods)
    assert (shared["attention"], shared["norms_layer_scale"]) == (377_794_560, 368_640)
    assert (counts["final_norms"], counts["projections_logit_scale"]) == (9_216, 7_082_497)
    assert mods["image"]["branch"] == 1_514_572_128
    assert sum(c["own"] for c in mods.values()) + shared["total"] + counts["logit_scale"] == counts["total"]


def test_info_json(capsys: pytest.CaptureFixture) -> None:
    assert main(["info", "onepeace-tiny", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"]["total"] == 3_652_993
    assert info["bytes"] == 4 * 3_652_993 and info["bytes_bf16"] == 2 * 3_652_993


def test_info_checkpoints(official_pt: Path, converted: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    for target in (official_pt, converted):
        assert main(["info", str(target)]) == 0
        out = capsys.readouterr().out
        assert f"parameters: {TINY_TOTAL}" in out and "float32" in out


# ----------------------------------------------------------------------------------------------- embed
def _check_rows(prefix: Path, model: onepeace.OnePeace, media: Path) -> list[dict]:
    emb, rows = _read(prefix)
    assert emb.dtype == np.float32 and emb.shape == (len(rows), model.cfg.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert [r["index"] for r in rows] == list(range(len(rows)))
    by_mod = {m: [i for i, r in enumerate(rows) if r["modality"] == m] for m in ("text", "image", "audio")}
    assert [rows[i]["text"] for i in by_mod["text"]] == TEXTS + ["a third text"]
    assert [rows[i]["line"] for i in by_mod["text"][:2]] == [1, 3] and rows[by_mod["text"][2]]["source"] == "text"
    images = [rows[i]["source"] for i in by_mod["image"]]
    audio = [rows[i]["source"] for i in by_mod["audio"]]
    assert [Path(p).name for p in images] == ["a.png", "b.jpg"]
    assert [Path(p).name for p in audio] == ["c.wav", "e.ogg", "d.wav"]
    ref = model.embed(text=TEXTS + ["a third text"], image=images, audio=audio)
    np.testing.assert_allclose(emb[by_mod["text"]], ref.text.numpy(), atol=1e-6)
    np.testing.assert_allclose(emb[by_mod["image"]], ref.image.numpy(), atol=1e-5)
    np.testing.assert_allclose(emb[by_mod["audio"]], ref.audio.numpy(), atol=1e-5)
    return rows


def test_embed_folder_default_model(media: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)  # the same model twice also where the package ships no weights
    assert main(["embed", str(media), "--text", "a third text", "--out", str(tmp_path / "e"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "text 3, image 2, audio 3" in out and "skipped 0" in out and "ignored 1" in out
    torch.manual_seed(0)
    _check_rows(tmp_path / "e", onepeace.load("onepeace-small"), media)


def test_embed_official_and_converted(
    media: Path, official_pt: Path, converted: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["embed", str(media), "--text", "a third text", "--batch-size", "4", "--quiet"]
    assert main(args + ["--model", str(official_pt), "--out", str(tmp_path / "pt")]) == 0
    assert main(args + ["--model", str(converted), "--out", str(tmp_path / "native")]) == 0
    assert "skipped 0" in capsys.readouterr().out
    rows = _check_rows(tmp_path / "pt", onepeace.load(official_pt), media)
    emb_pt, emb_native = np.load(tmp_path / "pt.npy"), np.load(tmp_path / "native.npy")
    assert np.array_equal(emb_pt, emb_native)
    assert _read(tmp_path / "native")[1] == rows


def test_embed_text_file_and_batch_retry(official_pt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "q.txt").write_text("first line\n  \nsecond line\n")
    (tmp_path / "ok.png").write_bytes((Path(__file__).parent / "fixtures" / "README.md").read_bytes())
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), (10, 120, 200)).save(good)
    args = ["embed", str(tmp_path / "ok.png"), str(good), "--text-file", str(tmp_path / "q.txt")]
    assert main(args + ["--model", str(official_pt), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "ok.png" in captured.err and "skipped 1" in captured.out
    emb, rows = _read(tmp_path / "o")
    assert [(r["modality"], r.get("line")) for r in rows] == [("image", None), ("text", 1), ("text", 3)]
    assert emb.shape == (3, 64)


def test_embed_skips_bad_files(media: Path, official_pt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "mixed"
    _write_media(folder)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    (folder / "letter.jpg").write_text("this is not an image\n")
    (folder / "noise.wav").write_bytes(b"RIFF" + os.urandom(200))
    args = ["embed", str(folder), "--model", str(official_pt), "--out", str(tmp_path / "m"), "--quiet"]
    assert main(args) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "skipped" in line]
    assert len(warnings) == 3
    for name in ("corrupt.png", "letter.jpg", "noise.wav"):
        assert sum(name in line for line in warnings) == 1
    assert "skipped 3" in captured.out and "Traceback" not in captured.err
    emb, rows = _read(tmp_path / "m")
    assert emb.shape[0] == len(rows) == 7


def test_nothing_embedded_exits_1(official_pt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "bad.png").write_text("nope")
    assert main(["embed", str(tmp_path), "--model", str(official_pt), "--out", str(tmp_path / "x")]) == 1
    assert "bad.png" in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "argv",
    [
        ["embed", "/nonexistent/input.png"],
        ["embed", "--text", "hi", "--model", "/nonexistent/model.pt"],
        ["embed", "--text", "hi", "--out", "/dev/null/dir/prefix"],
        ["embed"],
        ["info", "no-such-variant"],
        ["convert", "/nonexistent/checkpoint.pt", "/nonexistent/out"],
    ],
)
def test_errors_are_one_line(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    _one_error_line(capsys.readouterr().err)


def test_unknown_explicit_extension(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.md").write_text("hello\n")
    assert main(["embed", str(tmp_path / "notes.md")]) == 2
    assert "notes.md" in _one_error_line(capsys.readouterr().err)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": {}, "cfg": _Payload(marker)}, evil)
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    for argv in (["embed", "--text", "hi", "--model", str(evil)], ["info", str(evil)], ["info", str(plain)]):
        assert main(argv) == 2
        _one_error_line(capsys.readouterr().err)
    assert not marker.exists()


def test_debug_shows_traceback(capsys: pytest.CaptureFixture) -> None:
    assert main(["--debug", "embed", "/nonexistent/input.png"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("onepeace: error: ")


def test_keyboard_interrupt(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from onepeace import cli_embed

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_embed, "run", interrupted)
    assert main(["embed", "--text", "hi"]) == 130
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_convert_reports_files(official_pt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "conv"
    assert main(["convert", str(official_pt), str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert "model.safetensors" in printed and "config.json" in printed and TINY_TOTAL in printed


@pytest.mark.parametrize("argv", [["demo"], ["data", "build-demo", "corpus", "--heldout-only"]])
def test_a_named_fsdd_path_must_exist(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A path the user names is not a source to skip: a typo stops the run at once, before any work."""
    missing = str(tmp_path / "nope" / "recordings.tar.gz")
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--fsdd", missing]) == 2
    assert f"{missing} does not exist" in capsys.readouterr().err
    monkeypatch.setenv("ONEPEACE_FSDD", missing)
    assert main(["data", "build-demo", "corpus", "--heldout-only", "--sources", "fsdd"]) == 2
    assert (
        _one_error_line(capsys.readouterr().err)
        == f"onepeace: error: ONEPEACE_FSDD names {missing}, which does not exist"
    )
    assert not (tmp_path / "corpus").exists()
