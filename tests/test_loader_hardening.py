"""Hostile and broken checkpoints, model configs and run folders (issue 16, the loader rows): each test names the item
it covers. Every bad input gives one error naming the file and the problem, bounded in time and memory."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import official
import pytest
import torch

import onepeace
from onepeace.cli import main
from onepeace.errors import CheckpointError


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory: pytest.TempPathFactory, official_checkpoint: Path) -> Path:
    return onepeace.convert(official_checkpoint, tmp_path_factory.mktemp("native") / "tiny")


def _edited_native(native_dir: Path, tmp_path: Path, key: str, value: object) -> Path:
    """A copy of the tiny native directory whose config.json has ``key`` (dotted) set to ``value``."""
    out = tmp_path / "edited"
    shutil.copytree(native_dir, out)
    info = json.loads((out / "config.json").read_text())
    node = info["config"]
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    (out / "config.json").write_text(json.dumps(info))
    return out


def _edited_official(tmp_path: Path, section: str, key: str, value: object) -> Path:
    """The tiny official checkpoint with ``cfg.model.encoder[.section].key`` set to ``value``."""
    payload = official.checkpoint_meta()
    payload["model"] = official.inference_state_dict()
    node = payload["cfg"]["model"]["encoder"]
    node = node[section] if section else node
    node[key] = value
    path = tmp_path / "edited.pt"
    torch.save(payload, path)
    return path


def _cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The one error line of a CLI run that must fail with exit code 2."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onepeace: error: "), err
    return err[0]


# ---------------------------------------------------------------------------------------------- item 9
@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [("heads", 0, "config.heads must be between 1 and 1024, got 0"), ("embed_dim", -64, "config.embed_dim must be")],
)
def test_item9_config_values_out_of_range_are_one_line_errors(
    native_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: int, expected: str
) -> None:
    """Item 9: ``heads: 0`` and ``embed_dim: -64`` in info, convert and load give one error naming the key and file,
    not a ZeroDivisionError or a RuntimeError traceback."""
    edited = _edited_native(native_dir, tmp_path, key, value)
    config = str(edited / "config.json")
    for argv in (["info", str(edited)], ["convert", str(edited), str(tmp_path / "out")]):
        line = _cli_error(capsys, *argv)
        assert expected in line and config in line
    with pytest.raises(CheckpointError, match=expected) as caught:
        onepeace.load(edited)
    assert config in str(caught.value)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- item 15 (config)
def test_item15_huge_layer_count_is_refused_before_building(native_dir: Path, tmp_path: Path) -> None:
    """Item 15: a 1 KB config asking for 200,000 layers is refused at once (it kept ``load`` busy over 150 s)."""
    edited = _edited_native(native_dir, tmp_path, "layers", 200_000)
    began = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"config\.layers must be between 1 and 512, got 200000"):
        onepeace.load(edited)
    with pytest.raises(CheckpointError, match=r"cfg\.model\.encoder\.layers must be between 1 and 512"):
        onepeace.load(_edited_official(tmp_path, "", "layers", 200_000))
    assert time.perf_counter() - began < 5.0


# ---------------------------------------------------------------------------------------------- item 18
@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("", "embed_dim", "64", r"cfg\.model\.encoder\.embed_dim must be an integer, got '64' \(str\)"),
        ("", "layers", 2.5, r"cfg\.model\.encoder\.layers must be an integer, got 2\.5 \(float\)"),
        ("", "attention_heads", 0, r"cfg\.model\.encoder\.attention_heads must be between 1 and 1024, got 0"),
        (
            "audio_adapter",
            "feature_encoder_spec",
            "[(32, 10)] + [(32, 3, 2)] * 6",
            r"cfg\.model\.encoder\.audio_adapter\.feature_encoder_spec\[0\] must be a \(channels, kernel, stride\)",
        ),
    ],
)
def test_item18_wrong_type_official_config_values_name_key_and_file(
    tmp_path: Path, section: str, key: str, value: object, expected: str
) -> None:
    """Item 18: wrong-type values in an official checkpoint's cfg (``embed_dim: "64"``, ``layers: 2.5``, a 2-element
    feature-layer spec) are refused by the one validator, naming the cfg entry and the file (``"64"`` and 2.5 used to
    be cast silently; the spec error named neither)."""
    path = _edited_official(tmp_path, section, key, value)
    with pytest.raises(CheckpointError, match=expected) as caught:
        onepeace.load(path)
    assert str(path) in str(caught.value)


def test_item18_info_refuses_a_config_its_tensors_do_not_fit(
    native_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 18: ``info`` on a folder whose config says 3 layers but whose tensors hold 2 exits 2 naming the missing
    tensors and the config file (it printed the 3-layer config with exit 0)."""
    edited = _edited_native(native_dir, tmp_path, "layers", 3)
    line = _cli_error(capsys, "info", str(edited))
    assert str(edited / "config.json") in line
    assert "missing key(s): encoder.layers.2." in line
    assert main(["info", str(native_dir)]) == 0
    assert "2 layers" in capsys.readouterr().out
