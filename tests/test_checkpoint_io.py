"""Reading official fairseq checkpoints safely: layout, configuration objects, refused code, broken files."""

from __future__ import annotations

import argparse
import enum
import functools
import os
import pathlib
import pickle
import subprocess
import sys
import types

import official
import pytest
import torch
from safetensors.torch import save_file

from onepeace.checkpoints.pickle_io import load_state_dict_file, read_official_checkpoint
from onepeace.errors import CheckpointError


@pytest.fixture(scope="module")
def official_pt(tmp_path_factory) -> pathlib.Path:
    return official.write_official_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt")


def test_reads_official_layout(official_pt):
    state_dict, cfg = read_official_checkpoint(official_pt)
    expected = official.inference_state_dict()
    assert len(state_dict) == 140 and set(state_dict) == set(expected)
    for key, value in expected.items():
        assert state_dict[key].dtype == value.dtype and torch.equal(state_dict[key], value), key
    assert cfg == official.checkpoint_meta()["cfg"]
    assert cfg["task"]["patch_image_size"] == 64


def test_load_state_dict_file_reads_pt_and_safetensors(official_pt, tmp_path):
    state_dict, cfg = load_state_dict_file(official_pt)
    assert len(state_dict) == 140 and cfg["model"]["_name"] == "one_peace_retrieval"
    path = tmp_path / "weights.safetensors"
    save_file({"a": torch.arange(4.0)}, str(path), metadata={"cfg": '{"model": {"embed_dim": 64}}'})
    state_dict, cfg = load_state_dict_file(path)
    assert torch.equal(state_dict["a"], torch.arange(4.0)) and cfg == {"model": {"embed_dim": 64}}
    save_file({"a": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    assert load_state_dict_file(tmp_path / "plain.safetensors")[1] == {}


def test_legacy_non_zip_checkpoint(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"model": {"w": torch.ones(3)}, "cfg": {"x": 1}}, path, _use_new_zipfile_serialization=False)
    state_dict, cfg = read_official_checkpoint(path)
    assert torch.equal(state_dict["w"], torch.ones(3)) and cfg == {"x": 1}


def _install(monkeypatch, module: str, **objects) -> None:
    """Register ``objects`` under ``module`` (and its parents) so that pickle saves them under that name."""
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    for name, obj in objects.items():
        setattr(sys.modules[module], name, obj)


def test_config_objects_become_plain_data(tmp_path, monkeypatch):
    class DdpBackend(enum.StrEnum):
        __module__ = "fairseq.dataclass.constants"
        __qualname__ = "DDP_BACKEND_CHOICES"
        C10D = "c10d"

    _install(monkeypatch, "fairseq.dataclass.constants", DDP_BACKEND_CHOICES=DdpBackend)
    path = tmp_path / "namespace.pt"
    args = argparse.Namespace(arch="one_peace", lr=[1e-4], ddp_backend=DdpBackend.C10D)
    cfg = {
        "common": {"ddp_backend": DdpBackend.C10D, "save_dir": pathlib.PurePosixPath("/ckpt/run1")},
        "args": args,
        "seen": {1, 2},
        "none_type": type(None),
    }
    torch.save({"args": args, "cfg": cfg, "model": {"w": torch.ones(2)}}, path)
    state_dict, plain = read_official_checkpoint(path)
    assert torch.equal(state_dict["w"], torch.ones(2))
    assert plain["common"] == {"ddp_backend": "c10d", "save_dir": "/ckpt/run1"}
    assert plain["args"] == {"arch": "one_peace", "lr": [1e-4], "ddp_backend": "c10d"}
    assert sorted(plain["seen"]) == [1, 2]


def test_omegaconf_like_containers(tmp_path, monkeypatch):
    class AnyNode:
        __module__ = "omegaconf.nodes"

        def __init__(self, value):
            self._val, self._parent, self._metadata = value, None, {"ref_type": None}

    class DictConfig:
        __module__ = "omegaconf.dictconfig"

        def __init__(self, content):
            self._content, self._parent = content, None
            for node in content.values():
                node._parent = self  # reference cycles, as in omegaconf

    _install(monkeypatch, "omegaconf.nodes", AnyNode=AnyNode)
    _install(monkeypatch, "omegaconf.dictconfig", DictConfig=DictConfig)
    AnyNode.__qualname__, DictConfig.__qualname__ = "AnyNode", "DictConfig"
    cfg = DictConfig({"task": AnyNode(DictConfig({"patch_image_size": AnyNode(256)})), "seed": AnyNode(1)})
    path = tmp_path / "omegaconf.pt"
    torch.save({"cfg": cfg, "model": {"w": torch.zeros(1)}}, path)
    assert read_official_checkpoint(path)[1] == {"task": {"patch_image_size": 256}, "seed": 1}


class _Payload:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: pathlib.Path) -> dict[str, object]:
    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "system": _Payload(os.system, (f"touch {marker}",)),
        "eval": _Payload(eval, (touch,)),
        "exec": _Payload(exec, (touch,)),
        "Popen": _Payload(subprocess.Popen, (["touch", str(marker)],)),
        "partial": _Payload(functools.partial(os.system, f"touch {marker}"), ()),
    }


@pytest.mark.parametrize("kind", ["system", "eval", "exec", "Popen", "partial"])
@pytest.mark.parametrize("container", ["zip", "legacy", "plain_pickle"])
def test_code_in_pickle_is_refused_and_never_runs(tmp_path, kind, container):
    marker = tmp_path / "marker"
    payload = {"args": None, "cfg": {"common": _payloads(marker)[kind]}, "model": {"w": torch.ones(1)}}
    path = tmp_path / "evil.pt"
    if container == "plain_pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=container == "zip")
    with pytest.raises(CheckpointError) as info:
        read_official_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "refusing to load" in message
    names = {
        "system": "system",
        "eval": "builtins.eval",
        "exec": "builtins.exec",
        "Popen": "subprocess.Popen",
    }
    assert names.get(kind, "functools.partial") in message
    assert not marker.exists()


def test_truncated_checkpoint(official_pt, tmp_path):
    data = official_pt.read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as info:
        read_official_checkpoint(path)
    assert str(path) in str(info.value)


def test_truncated_legacy_checkpoint(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"model": {"w": torch.ones(1000)}}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="legacy.pt"):
        read_official_checkpoint(path)


@pytest.mark.parametrize("content", [b"hello, this is not a checkpoint\n", b""])
def test_text_file_named_pt(tmp_path, content):
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as info:
        read_official_checkpoint(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found") as info:
        read_official_checkpoint(tmp_path / "absent.pt")
    assert "absent.pt" in str(info.value)
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict_file(tmp_path / "absent.safetensors")


def test_no_model_entry_lists_keys(tmp_path):
    path = tmp_path / "nomodel.pt"
    torch.save({"args": None, "cfg": {}, "weights": {"w": torch.ones(1)}}, path)
    with pytest.raises(CheckpointError, match="no 'model' entry") as info:
        read_official_checkpoint(path)
    assert "'args', 'cfg', 'weights'" in str(info.value) and str(path) in str(info.value)


def test_model_not_a_dict_of_tensors(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"model": {"w": torch.ones(1), "step": 3}}, path)
    with pytest.raises(CheckpointError, match="'step'"):
        read_official_checkpoint(path)
    torch.save({"model": [torch.ones(1)]}, path)
    with pytest.raises(CheckpointError, match="list"):
        read_official_checkpoint(path)


def test_safetensors_passed_as_official_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    save_file({"a": torch.ones(2)}, str(path))
    with pytest.raises(CheckpointError, match="safetensors") as info:
        read_official_checkpoint(path)
    assert str(path) in str(info.value)
