"""Downstream-task data: TSV readers, image transforms, mixup / cutmix, datasets and loaders over tiny_tasks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from onepeace.config import AudioAdapterConfig
from onepeace.data.tokenizer import default_tokenizer
from onepeace.finetune import transforms as T
from onepeace.finetune.batch import TaskBatch
from onepeace.finetune.config import FinetuneConfig, FinetuneModelConfig, TaskDataConfig
from onepeace.finetune.data import build_task_loader, shard_indices, zero_shot_classes, zero_shot_prompts
from onepeace.finetune.readers import (
    AqaRow,
    ClassifyRow,
    GroundingRow,
    MultiLabelRow,
    Nlvr2Row,
    RetrievalRow,
    VqaRow,
    ZeroShotRow,
    parse_vqa_refs,
    read_class_names,
    read_task_tsv,
)
from onepeace.finetune.tasks import TaskKind, get_task

pytest.importorskip("soundfile")

DATA = Path(__file__).parent / "data"
TINY = DATA / "tiny_tasks"
SIZE = 32
AUDIO = AudioAdapterConfig()


def _tsv(path: Path, header: str, *rows: str) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def _read(task: str, path: Path, **kwargs):
    return read_task_tsv(get_task(task), [path], **kwargs)


def _cfg(task: str, path: Path | str, num_classes: int | None = None, **data) -> FinetuneConfig:
    options = {"image_size": SIZE, "batch_size": 4, "eval_batch_size": 4, "num_workers": 0, **data}
    return FinetuneConfig(
        task=task,
        model=FinetuneModelConfig(num_classes=num_classes),
        data=TaskDataConfig(train=(str(path),), valid=(str(path),), **options),
    )


def _first(cfg: FinetuneConfig, split: str, **kwargs) -> TaskBatch:
    return next(iter(build_task_loader(cfg, split, AUDIO, **kwargs)))


def _png(path: Path, size: tuple[int, int] = (40, 30)) -> str:
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path.name


# ---------------------------------------------------------------------------------------------------- readers
def test_vqa_reader_parses_refs_and_resolves_paths(tmp_path: Path) -> None:
    path = _tsv(
        tmp_path / "vqa.tsv",
        "uniq_id\timage\tquestion\trefs\textra",
        "q1\timgs/a.png\tWhat is it?\tcat|!+2|!+1.0&&dog|!+5|!+0.3\tx",
        "",
        "q2\t/abs/b.png\tHow many?\t\tx\ty",
    )
    rows = _read("vqa", path)
    assert rows == [
        VqaRow("q1", str(tmp_path / "imgs" / "a.png"), "What is it?", {2: 1.0, 5: 0.3}),
        VqaRow("q2", "/abs/b.png", "How many?", {}),
    ]
    assert _read("vqa", path, root="/data")[0].media == "/data/imgs/a.png"


def test_parse_vqa_refs_and_errors(tmp_path: Path) -> None:
    assert parse_vqa_refs("yes|!+5|!+1.0&&no|!+6|!+0.3") == {5: 1.0, 6: 0.3}
    assert parse_vqa_refs(" ") == {}
    with pytest.raises(ValueError, match="is not 'answer"):
        parse_vqa_refs("yes|!+5")
    with pytest.raises(ValueError, match="outside"):
        parse_vqa_refs("yes|!+5|!+1.5")
    path = _tsv(tmp_path / "v.tsv", "uniq_id\timage\tquestion\trefs", "1\ta.png\tq?\tyes|!+9|!+1.0")
    with pytest.raises(ValueError, match=r"v\.tsv, line 2: answer id '9' is out of range \[0, 7\]"):
        _read("vqa", path, num_classes=8)


def test_nlvr2_reader_labels(tmp_path: Path) -> None:
    header = "uniq_id\ttext\timage1\timage2\tlabel"
    path = _tsv(tmp_path / "n.tsv", header, "a\tTwo dogs.\tl.png\tr.png\tTrue", "b\tA cat.\tl.png\tr.png\tFalse")
    rows = _read("nlvr2", path)
    assert [(r.id, r.text, r.label) for r in rows] == [("a", "Two dogs.", 0), ("b", "A cat.", 1)]
    assert isinstance(rows[0], Nlvr2Row) and rows[0].media2 == str(tmp_path / "r.png")
    bad = _tsv(tmp_path / "bad.tsv", header, "a\tTwo dogs.\tl.png\tr.png\tTrue", "b\tx\tl.png\tr.png\tmaybe")
    with pytest.raises(ValueError, match=r"bad\.tsv, line 3: label 'maybe' must be True or False"):
        _read("nlvr2", bad)


def test_grounding_reader_boxes_and_ids(tmp_path: Path) -> None:
    header = "image\ttext\tregion_coord"
    path = _tsv(tmp_path / "r.tsv", header, "a.png\tthe dog\t1.5,2,30,40", "b.png\tleft man\t0,0,10,10")
    rows = _read("refcoco", path)
    assert rows[0] == GroundingRow("0", str(tmp_path / "a.png"), "the dog", (1.5, 2.0, 30.0, 40.0))
    assert rows[1].id == "1"
    for coords, problem in (("1,2,3", "must be 'x0,y0,x1,y1'"), ("5,0,5,9", "x0 < x1"), ("1,a,3,4", "not a number")):
        _tsv(path, header, f"a.png\tdog\t{coords}")
        with pytest.raises(ValueError, match=f"line 2: .*{problem}"):
            _read("refcoco", path)


def test_aqa_reader_choice_as_index_or_text(tmp_path: Path) -> None:
    header = "uniq_id\taudio\ttext\tduration"
    path = _tsv(
        tmp_path / "aqa.tsv",
        header,
        "1\ta.wav\tWhat is heard?&&&a dog&&&a cat&&&rain&&&wind&&&2\t3.0",
        "2\ta.wav\tWhere?&&&street&&&park&&&home&&&sea&&& park\t3.0",
    )
    rows = _read("aqa", path)
    assert rows[0] == AqaRow("1", str(tmp_path / "a.wav"), "What is heard?", ("a dog", "a cat", "rain", "wind"), 2)
    assert rows[1].label == 1
    for text, problem in (("q&&&a&&&b&&&c&&&d&&&e", "neither an index"), ("q&&&a&&&b&&&1", "got 4 parts")):
        _tsv(path, header, f"1\ta.wav\t{text}\t1")
        with pytest.raises(ValueError, match=f"aqa.tsv, line 2: .*{problem}"):
            _read("aqa", path)


def test_classification_readers(tmp_path: Path) -> None:
    audio = "uniq_id\taudio\ttext\tduration"
    assert _read("vggsound", _tsv(tmp_path / "v.tsv", audio, "7\tx.wav\t3\t1"), num_classes=4) == [
        ClassifyRow("7", str(tmp_path / "x.wav"), 3)
    ]
    with pytest.raises(ValueError, match=r"line 2: class id '4' is out of range \[0, 3\]"):
        _read("vggsound", _tsv(tmp_path / "v.tsv", audio, "7\tx.wav\t4\t1"), num_classes=4)
    with pytest.raises(ValueError, match="class id 'dog' is not an integer"):
        _read("vggsound", _tsv(tmp_path / "v.tsv", audio, "7\tx.wav\tdog\t1"))
    fsd = _tsv(tmp_path / "f.tsv", "uniq_id\taudio\trefs\tduration", "1\tx.wav\t3,1,3\t2", "2\tx.wav\t,\t2")
    with pytest.raises(ValueError, match="line 3: refs has no class id"):
        _read("fsd50k", fsd)
    assert _read("fsd50k", _tsv(fsd, "uniq_id\taudio\trefs", "1\tx.wav\t3,1,3"))[0] == MultiLabelRow(
        "1", str(tmp_path / "x.wav"), (1, 3)
    )
    image = "image\tlabel"
    rows = _read("imagenet", _tsv(tmp_path / "i.tsv", image, "a.png\t1", "b.png\t1000"))
    assert [(r.id, r.label) for r in rows] == [("0", 0), ("1", 999)]
    with pytest.raises(ValueError, match=r"line 2: label '0' is out of range \[1, 1000\]"):
        _read("imagenet", _tsv(tmp_path / "i.tsv", image, "a.png\t0"))


def test_retrieval_groups_over_concatenated_files(tmp_path: Path) -> None:
    header = "image_id\timage\tcaption"
    first = _tsv(tmp_path / "a.tsv", header, "1\tx.png\tA dog.", "1\tx.png\tA brown dog.", "2\ty.png\tA cat.")
    (tmp_path / "sub").mkdir()
    second = _tsv(tmp_path / "sub" / "b.tsv", header, "3\t../x.png\tOne dog.", "4\tz.png\tA cow.")
    rows = read_task_tsv(get_task("coco_retrieval"), [first, second])
    assert all(isinstance(r, RetrievalRow) for r in rows)
    assert [r.group for r in rows] == [0, 0, 1, 0, 2]  # sub/../x.png is x.png
    assert rows[4].media == str(tmp_path / "sub" / "z.png")
    with pytest.raises(ValueError, match=r"a\.tsv, line 3: empty 'caption'"):
        _read("coco_retrieval", _tsv(first, header, "1\tx.png\tA dog.", "2\ty.png\t  "))


def test_zero_shot_labels_index_sorted_class_names(tmp_path: Path) -> None:
    path = _tsv(tmp_path / "e.tsv", "uniq_id\taudio\ttext\tduration", "1\ta.wav\tdog\t5", "2\tb.wav\tcat\t5")
    rows = _read("esc50", path)
    assert rows[0] == ZeroShotRow("1", str(tmp_path / "a.wav"), "dog", 1) and rows[1].label == 0
    assert read_class_names(get_task("esc50"), path) == ("cat", "dog")
    assert zero_shot_prompts(["cat"], "A {label} sound") == ["A cat sound"]


def test_reader_format_errors(tmp_path: Path) -> None:
    path = _tsv(tmp_path / "x.tsv", "uniq_id\timage\tquestion", "1\ta.png\tq?")
    with pytest.raises(ValueError, match=r"x\.tsv, line 1: missing column\(s\) \['refs'\]"):
        _read("vqa", path)
    path = _tsv(tmp_path / "x.tsv", "uniq_id\timage\tquestion\trefs", "1\ta.png\tq?\t", "2\ta.png\tq?")
    with pytest.raises(ValueError, match="x.tsv, line 3: 3 tab-separated fields, the header has 4"):
        _read("vqa", path)
    path = _tsv(tmp_path / "x.tsv", "image\ttext\tregion_coord", "a.png\tthe\tdog\t1,2,3,4")
    with pytest.raises(ValueError, match=r"line 2: region_coord value 'dog\\t1' is not"):  # last column takes the tab
        _read("refcoco", path)
    with pytest.raises(ValueError, match="TSV file not found"):
        _read("vqa", tmp_path / "none.tsv")


# ---------------------------------------------------------------------------------------------------- transforms
def test_scale_box_hand_case() -> None:
    assert T.scale_box((20, 10, 100, 50), 200, 100, 384) == pytest.approx((0.1, 0.1, 0.5, 0.5))
    assert T.scale_box((-5, 0, 250, 100), 200, 100, 384) == pytest.approx((0.0, 0.0, 1.0, 1.0))
    img = Image.new("RGB", (200, 100), (0, 0, 255))
    image, box, size = T.grounding_transform(img, (20, 10, 100, 50), 64, True, np.random.default_rng(0))
    assert image.shape == (3, 64, 64) and size == (200, 100)
    assert box.dtype == torch.float32 and torch.allclose(box, torch.tensor([0.1, 0.1, 0.5, 0.5]))


def _noise_image(width: int = 80, height: int = 60) -> Image.Image:
    return Image.fromarray(np.random.default_rng(7).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", ["nlvr2_train", "imagenet_train"])
def test_train_transforms_shape_and_seed(name: str) -> None:
    fn = getattr(T, name)
    img = _noise_image()
    outs = [fn(img, SIZE, np.random.default_rng(seed)) for seed in (0, 0, 1, 2, 3)]
    assert all(o.shape == (3, SIZE, SIZE) and o.dtype == torch.float32 for o in outs)
    assert torch.equal(outs[0], outs[1])
    assert any(not torch.equal(outs[0], o) for o in outs[2:])


def test_eval_transforms() -> None:
    img = Image.new("RGB", (150, 50), (0, 0, 255))
    img.paste((255, 0, 0), (50, 0, 100, 50))  # red middle third
    crop = T.imagenet_eval(img, SIZE)  # 150x50 -> 96x32 -> centre 32x32 = the red third
    red = T.to_tensor(Image.new("RGB", (1, 1), (255, 0, 0)))[:, 0, 0]
    assert crop.shape == (3, SIZE, SIZE)
    assert torch.allclose(crop[:, :, 3:-3], red.view(3, 1, 1).expand(3, SIZE, SIZE - 6), atol=0.05)
    assert torch.equal(T.resize_square(img, SIZE), T.to_tensor(img.resize((SIZE, SIZE), Image.BICUBIC)))


def test_rand_augment_ops_and_erasing() -> None:
    img = _noise_image(40, 40)
    for op in T.RAND_AUGMENT_OPS:
        assert T.apply_op(img, op, 0.7, -1.0).size == img.size
    assert T.apply_op(img, "identity", 1.0, 1.0) is img
    shifted = np.asarray(T.apply_op(img, "translate_x", 1.0, 1.0))  # 0.45 * 40 = 18 px to the left, grey fill
    assert np.array_equal(shifted[:, :22], np.asarray(img)[:, 18:]) and (shifted[:, 22:] == 128).all()
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        T.apply_op(img, "solarize", 0.5, 1.0)
    x = torch.zeros(3, 16, 16)
    assert T.random_erasing(x, np.random.default_rng(0), prob=0.0) is x
    erased = T.random_erasing(x, np.random.default_rng(0), prob=1.0)
    changed = (erased != 0).any(0)
    rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
    assert changed.sum() == len(rows) * len(cols) > 0  # one filled rectangle


# ---------------------------------------------------------------------------------------------------- mixing
def test_smooth_one_hot_hand_case() -> None:
    out = T.smooth_one_hot(torch.tensor([0, 2]), 4, 0.2)
    assert torch.allclose(out, torch.tensor([[0.85, 0.05, 0.05, 0.05], [0.05, 0.05, 0.85, 0.05]]))


def test_mixup_hand_case() -> None:
    images = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])
    mixed, targets = T.mix_batch(images, torch.tensor([0, 1]), 2, (0.5, 0.0), 0.0, np.random.default_rng(3))
    lam = float(np.random.default_rng(3).beta(0.5, 0.5))
    assert torch.allclose(mixed[0], torch.full((3, 4, 4), 1 - lam)) and torch.allclose(
        mixed[1], torch.full_like(mixed[1], lam)
    )
    assert torch.allclose(targets, torch.tensor([[lam, 1 - lam], [1 - lam, lam]]))
    same, one_hot = T.mix_batch(images, torch.tensor([1, 0]), 2, (0.0, 0.0), 0.0, np.random.default_rng(3))
    assert same is images and torch.equal(one_hot, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def test_cutmix_targets_match_pasted_area() -> None:
    images = torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32)])
    for seed in range(5):
        mixed, targets = T.mix_batch(images, torch.tensor([0, 1]), 2, (0.0, 1.0), 0.0, np.random.default_rng(seed))
        assert torch.allclose(targets[0, 1], mixed[0].mean()) and torch.allclose(targets.sum(1), torch.ones(2))
    images = torch.randn(5, 3, 8, 8)
    for seed in range(4):
        _, targets = T.mix_batch(images, torch.tensor([0, 1, 2, 2, 1]), 3, (0.8, 1.0), 0.1, np.random.default_rng(seed))
        assert targets.shape == (5, 3) and torch.allclose(targets.sum(1), torch.ones(5)) and (targets > 0).all()


# ---------------------------------------------------------------------------------------------------- loaders
TINY_TASKS = [
    ("vggsound", TINY / "vggsound.tsv", 4),
    ("fsd50k", TINY / "fsd50k.tsv", 6),
    ("esc50", TINY / "esc50.tsv", None),
    ("aqa", TINY / "aqa.tsv", None),
    ("vqa", TINY / "vqa.tsv", 8),
    ("nlvr2", TINY / "nlvr2.tsv", None),
    ("refcoco", TINY / "refcoco.tsv", None),
    ("imagenet", TINY / "imagenet.tsv", 4),
    ("coco_retrieval", DATA / "tiny_pairs" / "image_text.tsv", None),
    ("audiocaps_retrieval", DATA / "tiny_pairs" / "audio_text.tsv", None),
]


def _check_shapes(batch: TaskBatch, cfg: FinetuneConfig) -> None:
    kind, b = cfg.spec.kind, batch.batch_size
    assert b == 4 and batch.skipped == ()
    if cfg.spec.media.value == "image":
        assert batch.image.shape == (b, 3, SIZE, SIZE)
    else:
        wave, mask = batch.audio
        assert wave.shape[0] == b and mask.shape[0] == b and mask.dtype == torch.bool
    k = 4 if kind is TaskKind.AQA else 1
    assert batch.num_choices == k
    has_text = kind in (TaskKind.RETRIEVAL, TaskKind.AQA, TaskKind.VQA, TaskKind.NLVR2, TaskKind.GROUNDING)
    assert (batch.text is not None) == has_text and (not has_text or batch.text.shape[0] == b * k)
    if kind in (TaskKind.CLASSIFY, TaskKind.IMAGE_CLASSIFY, TaskKind.NLVR2, TaskKind.AQA, TaskKind.ZERO_SHOT):
        assert batch.labels.shape == (b,) and batch.labels.dtype == torch.long
    if kind in (TaskKind.MULTILABEL, TaskKind.VQA):
        assert batch.soft_targets.shape == (b, cfg.num_classes)
    if kind is TaskKind.NLVR2:
        assert batch.image2.shape == (b, 3, SIZE, SIZE)
    if kind is TaskKind.GROUNDING:
        assert batch.boxes.shape == (b, 4) and batch.original_sizes.shape == (b, 2)
        assert ((batch.boxes >= 0) & (batch.boxes <= 1)).all()
    if kind is TaskKind.RETRIEVAL:
        assert batch.group.shape == (b,)


def _media(batch: TaskBatch) -> torch.Tensor:
    return batch.image if batch.image is not None else batch.audio_waveform


@pytest.mark.parametrize("task,path,num_classes", TINY_TASKS, ids=[t[0] for t in TINY_TASKS])
def test_tiny_task_loaders(task: str, path: Path, num_classes: int | None) -> None:
    cfg = _cfg(task, path, num_classes)
    splits = ("train", "valid") if cfg.spec.trainable else ("valid",)
    for split in splits:
        _check_shapes(_first(cfg, split), cfg)
    if "train" in splits:
        first, again = _first(cfg, "train"), _first(cfg, "train")
        assert again.ids == first.ids and torch.equal(_media(again), _media(first))
        assert _first(cfg, "train", epoch=1).ids != first.ids


def test_tiny_task_contents() -> None:
    aqa = _first(_cfg("aqa", TINY / "aqa.tsv"), "valid")
    expected = default_tokenizer()(["What animal makes this sound? answer: brown hen"])[0]
    assert torch.equal(aqa.text[0, : expected.shape[0]], expected) and aqa.labels[0] == 3
    vqa = _first(_cfg("vqa", TINY / "vqa.tsv", 8, num_workers=1), "valid")  # frog: amphibian 1.0, reptile 0.3
    assert torch.equal(vqa.soft_targets[0], torch.tensor([0, 0, 0, 0.3, 1.0, 0, 0, 0]))
    ground = _first(_cfg("refcoco", TINY / "refcoco.tsv"), "valid")
    w, h = Image.open(TINY / "grounding" / "frog.png").size
    assert torch.allclose(ground.boxes[0], torch.tensor([8 / w, 14 / h, 56 / w, 62 / h]))
    assert ground.original_sizes[0].tolist() == [w, h]
    cfg = _cfg("esc50", TINY / "esc50.tsv")
    loader = build_task_loader(cfg, "valid", AUDIO)
    names = zero_shot_classes(cfg)
    assert names == loader.dataset.class_names and len(names) == 8
    assert [names[i] for i in next(iter(loader)).labels] == ["frog", "chirping birds", "crow", "chirping birds"]
    mixed = _first(_cfg("imagenet", TINY / "imagenet.tsv", 4, mixup=0.8, cutmix=1.0), "train")
    assert mixed.soft_targets.shape == (4, 4) and torch.allclose(mixed.soft_targets.sum(1), torch.ones(4))


def test_shard_indices() -> None:
    parts = [shard_indices(7, True, r, 3, seed=5) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3] and set(np.concatenate(parts).tolist()) == set(range(7))
    assert np.concatenate([shard_indices(7, False, r, 3, 0) for r in range(3)]).tolist() == list(range(7))
    with pytest.raises(ValueError, match="rank"):
        shard_indices(7, True, 3, 3, 0)


def test_bad_records_are_counted_not_fatal(tmp_path: Path) -> None:
    good = _png(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    header = "image_id\timage\tcaption"
    rows = [
        f"0\t{good}\tA dog.",
        "1\tmissing.png\tA cat.",
        "2\tbroken.png\tA cow.",
        f"3\t{good}\t...",
        f"4\t{good}\tOk.",
    ]
    cfg = _cfg("coco_retrieval", _tsv(tmp_path / "r.tsv", header, *rows), batch_size=8, eval_batch_size=8)
    valid = _first(cfg, "valid")
    assert valid.ids == ("0", "4") and valid.image.shape[0] == 2
    assert dict(valid.skipped) == {"missing_file": 1, "bad_image": 1, "empty_text": 1}
    train = _first(cfg, "train")
    assert train.batch_size == 5 and dict(train.skipped) == dict(valid.skipped)
    assert set(train.ids) <= {"0", "4"}
    empty = _first(_cfg("coco_retrieval", _tsv(tmp_path / "e.tsv", header, "1\tmissing.png\tA cat.")), "valid")
    assert empty.batch_size == 0 and empty.skipped == (("missing_file", 1),)
