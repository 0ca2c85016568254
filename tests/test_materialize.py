"""Meta-device construction and per-rank materialisation give the eager construction's values exactly.

One process: :func:`onepeace.train.materialize.record_init` + :func:`materialize` against the eager build (the
pretraining objective of both stages and a fine-tuning task model). Two gloo ranks
(``dist_materialize_worker.py``): FSDP2-sharded and DDP-materialised objectives, from the seed and from starting
weights read shard by shard, equal the single-process eager build; FSDP ranks hold about half the elements.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_materialize_worker import ROOT, TASK_CASES, cases, task_recipe
from safetensors.torch import save_file
from torchrun import launch

from onepeace.errors import CheckpointError
from onepeace.finetune.build import build_task_model
from onepeace.train.build import build_objective, construct_objective, load_start_shards, read_start_weights
from onepeace.train.checkpoint import export_inference_weights
from onepeace.train.config import load_recipe
from onepeace.train.materialize import materialize, record_init

WORKER = Path(__file__).with_name("dist_materialize_worker.py")
TINY1, TINY2 = str(ROOT / "configs/tiny_stage1.yaml"), str(ROOT / "configs/tiny_stage2.yaml")


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    different = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k].cpu(), want[k])]
    assert not different, different[:8]


@pytest.mark.parametrize("recipe", [TINY1, TINY2])
def test_replayed_meta_construction_equals_eager(recipe: str) -> None:
    cfg = load_recipe(recipe, ["model.init_from=null", "seed=5"])
    record = record_init(lambda: construct_objective(cfg))
    assert all(p.is_meta for p in record.module.parameters())
    module = materialize(record, "cpu")
    _assert_same(module.state_dict(), build_objective(cfg).state_dict())
    index = next(k for k, _ in module.named_buffers() if k.endswith("rel_pos.index"))  # a computed buffer
    assert torch.equal(module.get_buffer(index), build_objective(cfg).get_buffer(index))


@pytest.mark.parametrize("task", ["imagenet", "vqa"])
def test_replayed_task_model_equals_eager(task: str) -> None:
    """The image-classification head starts from torch's ``trunc_normal_`` (rejection sampling, a no-op on meta)."""
    from onepeace.finetune.build import _start, construct_task

    cfg = task_recipe(task, "none", ["model.num_classes=8"])
    _, _, bcfg, classes = _start(cfg, lazy=True)
    module = materialize(record_init(lambda: construct_task(cfg, bcfg, classes)), "cpu")
    torch.manual_seed(cfg.seed + 1)  # the replay reseeds, as the eager construction does
    _assert_same(module.state_dict(), construct_task(cfg, bcfg, classes).state_dict())


def test_a_different_seed_gives_different_values() -> None:
    cfg = load_recipe(TINY1, ["seed=5"])
    other = materialize(record_init(lambda: construct_objective(load_recipe(TINY1, ["seed=6"]))), "cpu")
    weight = "model.encoder.layers.0.attn.q_proj.weight"
    assert not torch.equal(other.state_dict()[weight], build_objective(cfg).state_dict()[weight])


class _Mixed(torch.nn.Module):
    """A linear layer, a buffer made on the host inside a meta build, and a table filled from Python data."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 4)
        self.register_buffer("host", torch.arange(5, device="cpu"))
        self.table = torch.nn.Parameter(torch.tensor([[1.5, -2.0], [0.25, 4.0]]))


def test_host_tensors_and_python_data_survive_materialisation() -> None:
    def build() -> torch.nn.Module:
        torch.manual_seed(3)
        return _Mixed()

    module = materialize(record_init(build), "cpu")
    _assert_same(module.state_dict(), build().state_dict())
    assert module.table.tolist() == [[1.5, -2.0], [0.25, 4.0]] and module.host.tolist() == [0, 1, 2, 3, 4]


def test_gradient_hooks_of_plain_parameters_survive_materialisation() -> None:
    record = record_init(lambda: _Mixed())
    seen = []
    record.module.table.register_hook(lambda g: seen.append(("grad", g.sum().item())))
    record.module.table.register_post_accumulate_grad_hook(lambda p: seen.append(("accumulated", p.grad.sum().item())))
    module = materialize(record, "cpu")
    (module.table * 2).sum().backward()
    assert seen == [("grad", 8.0), ("accumulated", 8.0)]


def test_a_tensor_made_outside_the_recording_is_an_error() -> None:
    with torch.device("meta"):
        made_before = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="no recorded operation gives a value to"):
        materialize(record_init(lambda: made_before), "cpu")


@pytest.fixture(scope="module")
def starts(tmp_path_factory) -> tuple[Path, Path]:
    """A stage-1 training step directory (seed 11) and a backbone model directory of the same weights."""
    root = tmp_path_factory.mktemp("starts")
    objective = build_objective(load_recipe(TINY1, ["seed=11"]))
    state = {k: v.contiguous() for k, v in objective.state_dict().items()}
    step = root / "step"
    step.mkdir()
    save_file(state, str(step / "model.safetensors"))
    torch.save({}, step / "trainer.pt")
    (step / "COMPLETE").write_text('{"step": 1, "layout": "single", "world_size": 1}\n')  # a finished checkpoint
    backbone = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    export_inference_weights(backbone, objective.model.cfg, root / "native")
    return step, root / "native"


def test_sharded_start_checks_keys_as_the_full_load(starts: tuple[Path, Path]) -> None:
    step, native = starts
    cfg = load_recipe(TINY1, [f"model.init_from={native}"])
    with pytest.raises(CheckpointError) as eager:
        build_objective(cfg)
    module = materialize(record_init(lambda: construct_objective(cfg)), "cpu")
    with pytest.raises(CheckpointError) as sharded:
        load_start_shards(module, read_start_weights(native, lazy=True), 1)
    assert str(sharded.value) == str(eager.value) and "decoder.embed_in.text.weight" in str(eager.value)


def test_sharded_start_reads_rows_not_whole_tensors(starts: tuple[Path, Path], monkeypatch) -> None:
    """Every tensor with rows is read through ``get_slice`` (this rank's rows), none through ``get_tensor``."""
    from onepeace.train.shard_load import LazyTensor

    step, _ = starts
    cfg = load_recipe(TINY1, [f"model.init_from={step}"])
    module = materialize(record_init(lambda: construct_objective(cfg)), "cpu")
    whole, rows = [], []
    real_full, real_rows = LazyTensor.full, LazyTensor.rows
    monkeypatch.setattr(LazyTensor, "full", lambda self: whole.append(self.shape) or real_full(self))
    monkeypatch.setattr(LazyTensor, "rows", lambda self, a, b: rows.append(self.name) or real_rows(self, a, b))
    load_start_shards(module, read_start_weights(step, lazy=True), 1)
    assert whole == [()] and len(rows) == len(module.state_dict()) - 1  # logit_scale is 0-d
    _assert_same(module.state_dict(), build_objective(cfg).state_dict())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, starts: tuple[Path, Path]) -> tuple[Path, dict[str, tuple[str, list[str]]]]:
    out = tmp_path_factory.mktemp("materialize")
    step, native = starts
    launch([str(WORKER), str(out), str(step), str(native)], 2, 240)
    return out, cases(str(step), str(native))


def _eager(recipe: str, overrides: list[str]) -> torch.nn.Module:
    return build_objective(load_recipe(recipe, [o for o in overrides if not o.startswith("strategy=")]))


@pytest.mark.dist
@pytest.mark.parametrize("case", ["fsdp_scratch", "ddp_scratch", "fsdp_start", "fsdp_stage2", "ddp_stage2"])
def test_two_ranks_equal_the_eager_build(two_ranks, case: str) -> None:
    out, specs = two_ranks
    recipe, overrides = specs[case]
    eager = _eager(recipe, overrides)
    ranks = [torch.load(out / f"{case}.rank{r}.pt", weights_only=True) for r in (0, 1)]
    _assert_same(ranks[0]["state"], eager.state_dict())
    total = sum(p.numel() for p in eager.parameters())
    if case.startswith("ddp"):
        _assert_same(ranks[1]["state"], eager.state_dict())
        assert [r["held"] for r in ranks] == [total, total]
    else:
        assert ranks[1]["state"] == {}
        replicated = sum(p.numel() for p in eager.parameters() if p.ndim == 0)  # logit_scale: not sharded
        assert sum(r["held"] for r in ranks) == total + replicated and max(r["held"] for r in ranks) < 0.6 * total
        assert [r["logit_scale_grad"] for r in ranks] == [1.5, 1.5]  # (1 + 2) / 2: still averaged over ranks
    assert ranks[0]["requires_grad"] == {n: p.requires_grad for n, p in eager.named_parameters()}


@pytest.mark.dist
def test_two_ranks_reject_a_start_without_decoder_as_one_process(two_ranks) -> None:
    out, specs = two_ranks
    recipe, overrides = specs["fsdp_no_decoder"]
    with pytest.raises(CheckpointError) as eager:
        _eager(recipe, overrides)
    for r in (0, 1):
        assert torch.load(out / f"fsdp_no_decoder.rank{r}.pt", weights_only=True)["error"] == str(eager.value)


@pytest.mark.dist
@pytest.mark.parametrize("case", sorted(TASK_CASES))
def test_two_ranks_build_the_task_model_of_one_process(two_ranks, case: str) -> None:
    out, _ = two_ranks
    eager = build_task_model(task_recipe(*TASK_CASES[case]))
    ranks = [torch.load(out / f"{case}.rank{r}.pt", weights_only=True) for r in (0, 1)]
    _assert_same(ranks[0]["state"], eager.state_dict())
    if TASK_CASES[case][1] == "ddp":
        _assert_same(ranks[1]["state"], eager.state_dict())
    assert ranks[0]["requires_grad"] == {n: p.requires_grad for n, p in eager.named_parameters()}
