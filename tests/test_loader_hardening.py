"""Hostile and broken checkpoints, model configs and run folders (issue 16, the loader rows): each test names the item
it covers. Every bad input gives one error naming the file and the problem, bounded in time and memory."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import time
import zipfile
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


# ---------------------------------------------------------------------------------------------- item 4
def _call_pickle(module: str, name: str, arg: bytes) -> bytes:
    """A protocol-2 pickle of ``module.name(<arg>)``, ``arg`` being pickle opcodes that push one argument."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + arg + b"\x85R."


def _long(n: int) -> bytes:
    body = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(body)]) + body


@pytest.mark.parametrize(
    ("module", "name", "arg"),
    [
        ("builtins", "bytearray", _long(2_500_000_000)),
        ("builtins", "bytes", _long(20_000_000_000)),
        ("torch", "Tensor", _long(2_500_000_000)),
        ("__builtin__", "bytearray", _long(2_500_000_000)),
    ],
)
def test_item4_allocating_constructor_in_a_tiny_pickle_is_refused(
    tmp_path: Path, module: str, name: str, arg: bytes
) -> None:
    """Item 4: ``builtins.bytearray(2500000000)`` in a 49-byte checkpoint (and the same through ``bytes``,
    ``torch.Tensor`` and the Python 2 name) is refused before anything is allocated: the restricted unpickler
    charges every allocating constructor to a budget of the file's own size."""
    path = tmp_path / "bomb.pt"
    path.write_bytes(_call_pickle(module, name, arg))
    assert len(path.read_bytes()) < 49
    with pytest.raises(CheckpointError, match=r"bomb\.pt: its pickle asks .* more than the file can hold"):
        onepeace.load(path)


def test_item4_numpy_array_and_zip_pickle_bombs_are_refused(tmp_path: Path) -> None:
    """Item 4: a numpy ``_reconstruct`` of a 10^10-element array, and a bytearray bomb as the ``data.pkl`` of a zip
    archive (read through the memory-mapped path) are refused the same way."""
    shape = b"(" + _long(10_000_000_000) + b"tq\x00"
    numpy_bomb = b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + shape + b"C\x01b\x87R."
    path = tmp_path / "numpy.pt"
    path.write_bytes(numpy_bomb)
    with pytest.raises(CheckpointError, match="its pickle asks numpy.core.multiarray._reconstruct for"):
        onepeace.load(path)
    archive = tmp_path / "zipped.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, archive)
    with zipfile.ZipFile(archive) as src:
        members = {i.filename: src.read(i.filename) for i in src.infolist()}
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as dst:
        for name_, data in members.items():
            dst.writestr(
                name_,
                _call_pickle("builtins", "bytearray", _long(2_500_000_000)) if name_.endswith("data.pkl") else data,
            )
    with pytest.raises(CheckpointError, match="its pickle asks builtins.bytearray for 2,500,000,000 bytes"):
        onepeace.load(archive)


def test_item4_legacy_storage_larger_than_its_file_is_refused(tmp_path: Path) -> None:
    """Item 4: a legacy (non-zip) ``.pt`` whose pickle declares a 20 GB storage is refused before torch allocates
    the storage (the legacy reader allocates what the pickle declares, then reads it from the file)."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            return ("storage", torch.FloatStorage, "0", "cpu", 5_000_000_000, None) if obj == "STORAGE" else None

    buffer = io.BytesIO()
    for part in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(part, buffer, protocol=2)
    Pickler(buffer, protocol=2).dump({"model": {"w": "STORAGE"}})
    pickle.dump(["0"], buffer, protocol=2)
    path = tmp_path / "legacy.pt"
    path.write_bytes(buffer.getvalue() + (8).to_bytes(8, "little") + bytes(32))
    with pytest.raises(CheckpointError, match="its pickle asks tensor storage '0' for 20,000,000,000 bytes"):
        onepeace.load(path)


def test_item4_real_checkpoints_still_load(official_checkpoint: Path, tmp_path: Path) -> None:
    """Item 4: the bounds refuse nothing real: the official tiny checkpoint (zip, mapped) and the same weights saved
    in the legacy format load to the same tensors."""
    reference = official.inference_state_dict()
    legacy = tmp_path / "legacy.pt"
    payload = official.checkpoint_meta()
    payload["model"] = reference
    torch.save(payload, legacy, _use_new_zipfile_serialization=False)
    from onepeace.checkpoints.pickle_io import read_official_checkpoint

    for path in (official_checkpoint, legacy):
        state, cfg = read_official_checkpoint(path)
        assert cfg == official.checkpoint_meta()["cfg"]
        assert set(state) == set(reference)
        assert all(torch.equal(torch.as_tensor(state[k]), v) for k, v in reference.items())


# ---------------------------------------------------------------------------------------------- item 15 (deflate)
def test_item15_deflate_bomb_member_is_refused_before_it_expands(tmp_path: Path) -> None:
    """Item 15: a zip checkpoint whose 2-element tensor's storage member is 200 MB of deflated zeros (about 200 KB
    on disk) is refused from the sizes the archive declares, before anything is decompressed (it cost 1.05 GB)."""
    stored = tmp_path / "stored.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, stored)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(stored) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                with dst.open(info.filename, "w") as member:
                    for _ in range(200):
                        member.write(bytes(1 << 20))
            else:
                dst.writestr(info.filename, src.read(info.filename))
    assert bomb.stat().st_size < 1 << 20
    began = time.perf_counter()
    for read in (onepeace.load, _read_official):
        with pytest.raises(
            CheckpointError, match=r"declares 8 bytes for storage '0', but the archive holds 209,715,200"
        ):
            read(bomb)
    assert time.perf_counter() - began < 2.0


def _read_official(path: Path) -> object:
    from onepeace.checkpoints.pickle_io import read_official_checkpoint

    return read_official_checkpoint(path)


# ---------------------------------------------------------------------------------------------- item 16
ROOT = Path(__file__).resolve().parents[1]


def _trainee(seed: int):
    from onepeace.train.core import Trainee

    torch.manual_seed(seed)
    module = torch.nn.Linear(3, 2)
    return Trainee(module, module, torch.optim.SGD(module.parameters(), lr=0.1), None)


def _run_with_two_checkpoints(run: Path) -> dict[int, dict[str, torch.Tensor]]:
    from onepeace.train.checkpoint import save_training_state

    weights = {}
    for step in (1, 2):
        trainee = _trainee(step)
        save_training_state(
            run, step, trainee.module, trainee.optimizer, None, data_position={"epoch": 0, "batch": step}
        )
        weights[step] = {k: v.clone() for k, v in trainee.module.state_dict().items()}
    return weights


def _one_process():
    from onepeace.train.distributed import DistInfo

    return DistInfo(0, 1, 0, torch.device("cpu"))


def test_item16_resume_of_a_missing_run_folder_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Item 16: ``pretrain --resume`` of a folder that does not exist exits 2 naming it (it trained from step 0 and
    exited 0); an existing folder without a checkpoint still starts fresh."""
    from onepeace.train.core import resume

    missing = tmp_path / "no_such_run"
    argv = ["pretrain", "--config", str(ROOT / "configs" / "tiny_stage1.yaml"), "--resume", str(missing)]
    argv += [f"out_dir={tmp_path / 'out'}", f"data.paths=[{ROOT / 'tests' / 'data' / 'tiny_pairs' / 'image_text.tsv'}]"]
    line = _cli_error(capsys, *argv, "optim.total_updates=2")
    assert line == f"onepeace: error: cannot resume from {missing}: no such run folder"
    assert not (tmp_path / "out" / "step_00000002").exists()
    (tmp_path / "empty").mkdir()
    assert resume(tmp_path / "empty", _trainee(0), _one_process()) == (0, None)


@pytest.mark.parametrize("damage", ["weights", "trainer"])
def test_item16_damaged_latest_checkpoint_falls_back_with_a_warning(tmp_path: Path, damage: str) -> None:
    """Item 16: when the newest complete checkpoint has a damaged file, resume warns naming it and restores the
    previous complete one exactly (it raised a traceback); when none is readable, one error names each."""
    from onepeace.train.core import resume

    run = tmp_path / "run"
    weights = _run_with_two_checkpoints(run)
    damaged = run / "step_00000002" / ("model.safetensors" if damage == "weights" else "trainer.pt")
    damaged.write_bytes(damaged.read_bytes()[: len(damaged.read_bytes()) // 2])
    trainee = _trainee(7)
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint .*step_00000002: .*trying the previous one"):
        step, position = resume(run, trainee, _one_process())
    assert (step, position) == (1, {"epoch": 0, "batch": 1})
    assert all(torch.equal(v, weights[1][k]) for k, v in trainee.module.state_dict().items())
    first = run / "step_00000001" / damaged.name
    first.write_bytes(b"")
    with (
        pytest.warns(UserWarning),
        pytest.raises(CheckpointError, match="no complete checkpoint is readable") as caught,
    ):
        resume(run, _trainee(7), _one_process())
    assert "step_00000002" in str(caught.value) and "step_00000001" in str(caught.value)


def _bounded_fields() -> list[tuple[str, object]]:
    """``(dotted key, a value below its range)`` for every ranged field of the model config and its sections."""
    import dataclasses
    import typing

    from onepeace.config import OnePeaceConfig

    sections = [("", OnePeaceConfig)]
    sections += [(f"{name}.", type(getattr(OnePeaceConfig(), name))) for name in ("text", "image", "audio")]
    out: list[tuple[str, object]] = []
    for prefix, section in sections:
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            spec = f.metadata.get("bounds")
            if spec is None:
                continue
            if "items" in spec:
                out.append((f"{prefix}{f.name}[0][0]", [[0, 1, 1]]))
            else:
                out.append((prefix + f.name, spec["low"] - (1 if hints[f.name] is int else 0.5)))
    return out


@pytest.mark.parametrize(("key", "value"), _bounded_fields())
def test_item18_every_ranged_field_is_named_with_its_file(
    native_dir: Path, tmp_path: Path, key: str, value: object
) -> None:
    """Item 18: the one validator names the dotted key and the file for every ranged field of a model config."""
    edited = _edited_native(native_dir, tmp_path, key.split("[")[0], value)
    with pytest.raises(CheckpointError) as caught:
        onepeace.load(edited)
    message = str(caught.value)
    assert f"config.{key} must be " in message and str(edited / "config.json") in message
