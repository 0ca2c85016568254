"""Shard sample counts from a manifest written once (``onepeace data index-shards``), on the shards of
``test_pretrain_data`` (3 shards per stage holding 5, 4 and 4 samples)."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import threading
from pathlib import Path

import pytest
from test_pretrain_data import _config, data, wds  # noqa: F401  (the shard fixture)

from onepeace.cli import main
from onepeace.data import pretrain_shards
from onepeace.data.pretrain import build_pretrain_loader
from onepeace.data.shard_manifest import MANIFEST, index_shards, read_manifest, shard_counts, stale_entries
from onepeace.errors import InputError

PER_SHARD = [5, 4, 4]  # the fixture deals its 13 records to 3 shards in turn


@pytest.fixture()
def shard_dir(data, tmp_path: Path) -> Path:  # noqa: F811
    """A fresh copy of the stage-1 shards (no manifest)."""
    source = Path(data[("webdataset", 1)][0]).parent
    for i in range(3):
        shutil.copy2(source / f"s1_{i}.tar", tmp_path / f"s1_{i}.tar")
    return tmp_path


def _shards(root: Path) -> list[str]:
    return [str(root / f"s1_{i}.tar") for i in range(3)]


def test_index_shards_counts_equal_the_tar_counts(shard_dir: Path, capsys) -> None:
    assert main(["data", "index-shards", str(shard_dir)]) == 0
    assert "3 shards, 13 samples" in capsys.readouterr().out
    entries = read_manifest(shard_dir)
    assert [entries[f"s1_{i}.tar"]["samples"] for i in range(3)] == PER_SHARD
    assert [pretrain_shards.count_shard_samples(s) for s in _shards(shard_dir)] == PER_SHARD
    assert entries["s1_0.tar"]["size"] == os.path.getsize(shard_dir / "s1_0.tar")
    assert json.loads((shard_dir / MANIFEST).read_text())["format"] == "onepeace-shard-manifest/1"


def test_first_use_writes_the_manifest_on_rank_0(shard_dir: Path) -> None:
    assert shard_counts(_shards(shard_dir), rank=0) == PER_SHARD
    assert sorted(read_manifest(shard_dir)) == ["s1_0.tar", "s1_1.tar", "s1_2.tar"]


def _rewrite(path: Path, samples: int) -> None:
    with wds.TarWriter(str(path)) as sink:
        for i in range(samples):
            sink.write({"__key__": f"k{i}", "txt": b"a caption"})


def test_a_stale_manifest_is_detected_and_rebuilt(shard_dir: Path) -> None:
    index_shards(shard_dir)
    _rewrite(shard_dir / "s1_1.tar", 7)  # changed size
    shutil.copy2(shard_dir / "s1_0.tar", shard_dir / "s1_3.tar")  # added
    shards = [*_shards(shard_dir), str(shard_dir / "s1_3.tar")]
    names = [Path(s).name for s in shards]
    assert stale_entries(shard_dir, names, read_manifest(shard_dir)) == ["s1_1.tar", "s1_3.tar"]
    with pytest.warns(UserWarning, match="does not match shard"):
        assert shard_counts(shards, rank=0) == [5, 7, 4, 5]
    assert stale_entries(shard_dir, names, read_manifest(shard_dir)) == []


def test_an_unreadable_manifest_is_reported(shard_dir: Path) -> None:
    (shard_dir / MANIFEST).write_text('{"format": "something else"}')
    with pytest.raises(InputError, match="is not a shard manifest"):
        shard_counts(_shards(shard_dir))


def test_other_ranks_wait_for_rank_0(shard_dir: Path, monkeypatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("ONEPEACE_MANIFEST_WAIT", "0.3")
    with pytest.raises(InputError, match="onepeace data index-shards"):
        shard_counts(_shards(shard_dir), rank=1)
    assert not (shard_dir / MANIFEST).exists()  # rank 1 neither counts nor writes
    monkeypatch.setenv("ONEPEACE_MANIFEST_WAIT", "30")
    writer = threading.Timer(0.5, lambda: shard_counts(_shards(shard_dir), rank=0))
    writer.start()
    assert shard_counts(_shards(shard_dir), rank=1) == PER_SHARD
    writer.join()


def test_the_loader_reads_no_tar_header_when_the_manifest_is_valid(data, shard_dir: Path, monkeypatch) -> None:  # noqa: F811
    opened = []
    real_open = tarfile.open

    def counting_open(*args, **kwargs):
        opened.append(args[0] if args else kwargs.get("name"))
        return real_open(*args, **kwargs)

    monkeypatch.setattr(tarfile, "open", counting_open)
    config = _config({("webdataset", 1): (str(shard_dir / "s1_{0..2}.tar"),)}, "webdataset", 1, num_workers=0)
    pretrain_shards._count_samples.cache_clear()
    first = len(build_pretrain_loader(config, 0, 2, seed=5, epoch=0))  # no manifest yet: rank 0 counts and writes
    assert len(opened) == 3 and (shard_dir / MANIFEST).is_file()
    opened.clear()
    pretrain_shards._count_samples.cache_clear()
    for rank in (0, 1):
        assert len(build_pretrain_loader(config, rank, 2, seed=5, epoch=1)) == first
    assert opened == []
