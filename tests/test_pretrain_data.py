"""Pretraining loader: TSV and tar-shard sources, rank sharding, bad-record accounting, exact resume."""

from __future__ import annotations

import io
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from onepeace.data.batch import VIEWS_STAGE1, VIEWS_STAGE2
from onepeace.data.pretrain import LoadedBatch, PretrainDataConfig, build_pretrain_loader
from onepeace.data.pretrain_examples import sample_crop_box
from onepeace.data.pretrain_shards import batches_taken, plan_shards
from onepeace.data.pretrain_sources import BadRecord, EpochBatchSampler, TsvIndex, cap_groups

sf = pytest.importorskip("soundfile")
wds = pytest.importorskip("webdataset")

GOOD = 10  # usable records per data set
BAD_REASONS = {
    "tsv": {
        1: {"bad_image": 1, "missing_file": 1, "empty_text": 1},
        2: {"bad_audio": 1, "missing_file": 1, "empty_text": 1},
    },
    "webdataset": {
        1: {"bad_image": 1, "missing_media": 1, "empty_text": 1},
        2: {"bad_audio": 1, "missing_media": 1, "empty_text": 1},
    },
}


def _png(rng: np.random.Generator, i: int) -> bytes:
    size = [(64, 64), (80, 48), (40, 90), (300, 20), (33, 57)][i % 5]  # (300, 20) needs the crop fallback
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _wav(rng: np.random.Generator, i: int) -> bytes:
    seconds = [0.6, 1.0, 1.7, 1.25][i % 4]
    buf = io.BytesIO()
    sf.write(buf, rng.standard_normal(int(16000 * seconds)).astype(np.float32) * 0.1, 16000, format="WAV")
    return buf.getvalue()


def _records(stage: int) -> list[tuple[str, str, bytes | None]]:
    """(id, caption, media bytes or None = missing): GOOD usable records, then a corrupt, a missing, an empty one."""
    rng = np.random.default_rng(stage)
    make = _png if stage == 1 else _wav
    good = [(f"{i}", f"A caption number {i}, with  several\twords!", make(rng, i)) for i in range(GOOD)]
    return good + [
        ("90", "a corrupt one", b"not a media file"),
        ("91", "a missing one", None),
        ("92", ",.!  ", make(rng, 0)),
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], tuple[str, ...]]:
    """Paths per (format, stage): one TSV (records interleaved), or three tar shards."""
    root = tmp_path_factory.mktemp("pretrain")
    out = {}
    for stage, (ext, header) in {
        1: ("png", "image_id\timage\tcaption"),
        2: ("wav", "uniq_id\taudio\ttext\tduration"),
    }.items():
        records = _records(stage)
        order = [0, 10, 1, 2, 3, 11, 4, 5, 6, 12, 7, 8, 9]
        lines = [header]
        for key, caption, media in (records[i] for i in order):
            if media is not None:
                (root / f"{stage}_{key}.{ext}").write_bytes(media)
            lines.append(f"{key}\t{stage}_{key}.{ext}\t{caption}" + ("\t1.0" if stage == 2 else ""))
        (root / f"stage{stage}.tsv").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
        out[("tsv", stage)] = (str(root / f"stage{stage}.tsv"),)
        for shard in range(3):
            with wds.TarWriter(str(root / f"s{stage}_{shard}.tar")) as sink:
                for key, caption, media in (records[i] for i in order[shard::3]):
                    sample = {"__key__": key, "txt": caption.encode()}
                    if media is not None:
                        sample[ext] = media
                    sink.write(sample)
        out[("webdataset", stage)] = (str(root / f"s{stage}_{{0..2}}.tar"),)
    return out


def _config(data: dict, fmt: str, stage: int, **kw) -> PretrainDataConfig:
    kw = {"batch_size": 3, "num_workers": 2, "image_size": 64, **kw}
    return PretrainDataConfig(paths=data[(fmt, stage)], format=fmt, stage=stage, **kw)


def _check_batch(batch: LoadedBatch, stage: int) -> None:
    b, n = batch.text.shape
    assert isinstance(batch, LoadedBatch) and batch.text.dtype == torch.int64 and b == 3
    assert set(batch.views) == set(VIEWS_STAGE1 if stage == 1 else VIEWS_STAGE2)
    if stage == 1:
        assert batch.image.shape == (3, 3, 64, 64) and batch.image.dtype == torch.float32 and batch.audio is None
        widths = {"text": n + 1, "vl_text": n + 1, "image": 17, "vl_image": 17}
        assert batch.views["image"].mask.sum(1).tolist() == [12] * 3
        assert batch.views["vl_image"].mask.sum(1).tolist() == [11] * 3
    else:
        wave, pad = batch.audio
        assert wave.dtype == torch.float32 and pad.dtype == torch.bool and batch.image is None
        widths = {"al_text": n + 1, "audio": pad.shape[1], "al_audio": pad.shape[1]}
        frames = (~pad).sum(1) - 1
        for view, ratio in (("audio", 0.55), ("al_audio", 0.45)):
            assert batch.views[view].mask.sum(1).tolist() == [math.floor(ratio * t) for t in frames.tolist()]
            assert not (batch.views[view].mask & pad).any()  # padding never masked
    for name, view in batch.views.items():
        assert view.mask.shape == (b, widths[name]) and view.mask.dtype == torch.bool
        assert not view.mask[:, 0].any()  # cls
        for i in range(b):
            kept = torch.nonzero(~view.mask[i]).flatten()
            if name.endswith("text"):
                eos = int((batch.text[i] != 1).sum())  # eos position in the cls-prefixed sequence
                assert not view.mask[i, eos]  # eos never masked
                kept = kept[kept <= eos]
            elif name.endswith("audio"):
                kept = kept[kept < int((~batch.audio[1][i]).sum())]
            assert view.keep[i, : kept.numel()].tolist() == kept.tolist()
            assert (view.keep[i, kept.numel() :] == -1).all()


def _epoch(config: PretrainDataConfig, world_size: int, **kw) -> list[list[LoadedBatch]]:
    return [list(build_pretrain_loader(config, rank, world_size, seed=5, epoch=0, **kw)) for rank in range(world_size)]


@pytest.mark.parametrize("fmt", ["tsv", "webdataset"])
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("world_size", [1, 2])
def test_epoch_covers_all_records_equal_batches_and_counts_bad_ones(data, fmt, stage, world_size) -> None:
    config = _config(data, fmt, stage)
    ranks = _epoch(config, world_size)
    assert len({len(batches) for batches in ranks}) == 1  # every rank has the same number of full batches
    assert len(build_pretrain_loader(config, 0, world_size, seed=5, epoch=0)) == len(ranks[0])
    keys, skipped, real = set(), Counter(), 0
    for batches in ranks:
        for batch in batches:
            _check_batch(batch, stage)
            keys.update(batch.keys)
            skipped.update(batch.skipped)
            real += batch.num_samples
    assert keys == {str(i) for i in range(GOOD)}
    assert dict(skipped) == BAD_REASONS[fmt][stage]
    assert real == GOOD  # every usable record once, repeats and replacements not counted


@pytest.mark.parametrize("fmt", ["tsv", "webdataset"])
def test_skipping_batches_reproduces_the_tail_of_the_epoch(data, fmt) -> None:
    config = _config(data, fmt, 1, batch_size=2)
    full = list(build_pretrain_loader(config, 1, 2, seed=9, epoch=3))
    for skip in (1, 3):
        tail = list(build_pretrain_loader(config, 1, 2, seed=9, epoch=3, skip_batches=skip))
        assert len(tail) == len(full) - skip
        for a, b in zip(tail, full[skip:]):
            assert a.keys == b.keys and torch.equal(a.text, b.text) and torch.equal(a.image, b.image)
            for name in a.views:
                assert torch.equal(a.views[name].mask, b.views[name].mask)
                assert torch.equal(a.views[name].keep, b.views[name].keep)


def test_same_seed_same_batches_other_epoch_other_order(data) -> None:
    config = _config(data, "tsv", 1, num_workers=0)
    first, again = (list(build_pretrain_loader(config, seed=1, epoch=0)) for _ in range(2))
    other = list(build_pretrain_loader(config, seed=1, epoch=1))
    assert [b.keys for b in first] == [b.keys for b in again]
    assert all(
        torch.equal(a.image, b.image) and torch.equal(a.views["text"].mask, b.views["text"].mask)
        for a, b in zip(first, again)
    )
    assert [b.keys for b in first] != [b.keys for b in other]


def test_tsv_index_reads_rows_lazily(tmp_path: Path) -> None:
    path = tmp_path / "rows.tsv"
    path.write_bytes(b"image_id\tcaption\timage\r\n7\ta dog\tx/a.png\r\n\n8\tonly two\n9\tcat\tb.png\textra\tfields")
    index = TsvIndex([str(path)], ("image_id", "image", "caption"), root="/data")
    assert len(index) == 3
    first = index.record(0)
    assert (first.key, first.text, first.media) == ("7", "a dog", "/data/x/a.png")
    with pytest.raises(BadRecord) as info:
        index.record(1)
    assert info.value.reason == "bad_row"
    assert index.record(2).media == "/data/b.png\textra\tfields"  # at most as many fields as the header


def test_cap_groups_keeps_the_first_occurrences_in_order() -> None:
    groups = np.array([0, 0, 0, 1, 1, 0])  # record id -> group
    order = np.array([5, 3, 1, 0, 2, 4])  # groups along it: 0 1 0 0 0 1 -> ranks 0 0 1 2 3 1
    assert cap_groups(order, groups, 2).tolist() == [5, 3, 1, 4]
    assert cap_groups(order, groups, 1).tolist() == [5, 3]
    assert cap_groups(order, groups, 9).tolist() == order.tolist()


def test_text_groups_and_capped_epochs(tmp_path: Path) -> None:
    rows = ["uniq_id\taudio\ttext\tduration"]
    texts = ["seven"] * 7 + ["a dog"] * 2 + [" seven "] + ["a cat"]  # " seven " is the same caption
    rows += [f"{i}\tx{i}.wav\t{t}\t1.0" for i, t in enumerate(texts)] + ["99\tonly three\tfields"]
    path = tmp_path / "rows.tsv"
    path.write_text("\n".join(rows) + "\n")
    index = TsvIndex([str(path)], ("uniq_id", "audio", "text"))
    groups = index.text_groups()
    assert groups.tolist() == [0] * 7 + [1, 1, 0, 2, 3]  # the malformed row is a group of its own
    epochs = [list(EpochBatchSampler(len(index), 2, 0, 1, 5, e, groups=groups, max_per_group=3)) for e in range(4)]
    chosen = []
    for batches in epochs:
        ids = [slot.index for batch in batches for slot in batch if not slot.duplicate]
        assert len(batches) == 4 and len(ids) == len(set(ids)) == 3 + 2 + 1 + 1  # min(n, 3) per caption
        assert Counter(groups[ids].tolist()) == {0: 3, 1: 2, 2: 1, 3: 1}
        chosen.append(frozenset(i for i in ids if groups[i] == 0))
    assert len(set(chosen)) > 1  # a fresh choice of the frequent caption's rows each epoch
    again = list(EpochBatchSampler(len(index), 2, 0, 1, 5, 2, groups=groups, max_per_group=3))
    assert again == epochs[2]
    with pytest.raises(ValueError, match="max_per_group"):
        EpochBatchSampler(len(index), 2, 0, 1, 5, 0, groups=groups[:3], max_per_group=3)


def test_crop_box_stays_inside_and_falls_back_to_centre() -> None:
    rng = np.random.default_rng(0)
    for width, height in [(64, 64), (80, 48), (40, 90), (1, 1)]:
        for _ in range(50):
            left, top, w, h = sample_crop_box(width, height, (0.9, 1.0), (3 / 4, 4 / 3), rng)
            assert 0 <= left and left + w <= width and 0 <= top and top + h <= height and w > 0 and h > 0
    assert sample_crop_box(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3), rng) == ((1000 - 13) // 2, 0, 13, 10)
    assert sample_crop_box(10, 1000, (0.9, 1.0), (3 / 4, 4 / 3), rng) == (0, (1000 - 13) // 2, 10, 13)


def test_shard_plans_even_out_ranks_and_replay_worker_order() -> None:
    shards = [f"s{i}" for i in range(5)]
    plans = plan_shards(shards, [7, 1, 4, 0, 9], world_size=2, num_workers=2, batch_size=3, seed=0, epoch=0)
    assert len({sum(p.num_batches for p in rank) for rank in plans}) == 1
    assert sorted(s for rank in plans for p in rank for s in p.shards) == shards
    for rank in plans:
        assert all(p.num_batches * 3 >= p.num_real for p in rank)
    assert batches_taken([3, 1], 3) == ([2, 1], 1)
    assert batches_taken([1, 3, 2], 4) == ([1, 2, 1], 2)
    with pytest.raises(ValueError):
        batches_taken([1, 1], 3)


def test_config_validation_and_from_dict() -> None:
    config = PretrainDataConfig.from_dict({"paths": ["a.tsv"], "crop_scale": [0.8, 1.0], "stage": 2})
    assert config.paths == ("a.tsv",) and config.crop_scale == (0.8, 1.0) and config.views == VIEWS_STAGE2
    assert PretrainDataConfig().num_patches == 256
    with pytest.raises(ValueError, match="unknown"):
        PretrainDataConfig.from_dict({"batch": 3})
    for bad in (
        {"format": "csv"},
        {"stage": 3},
        {"image_size": 100},
        {"vl_image_mask_ratio": 0.1},
        {"max_duration": 30},
        {"max_per_text": 0},
        {"max_per_text": 2, "format": "webdataset"},
    ):
        with pytest.raises(ValueError):
            PretrainDataConfig(**bad)
    with pytest.raises(ValueError, match="paths"):
        build_pretrain_loader(PretrainDataConfig())
