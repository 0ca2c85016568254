"""The training core through fine-tuning: exact resume, rank-averaged logging of every loss term (2 gloo ranks,
checked against the losses computed by hand), an unfinished checkpoint is skipped, and the export command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchrun import launch

from onepeace.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "finetune" / "tiny"
TASKS = ROOT / "tests" / "data" / "tiny_tasks"


def _rows(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows}


def _imagenet(run: Path, data: Path, *extra: str) -> list[str]:
    args = ["finetune", "--task", "imagenet", "--config", str(TINY / "imagenet.yaml"), f"out_dir={run}"]
    args += [f"data.train=[{data}]", f"data.root={TASKS}", "data.valid=[]", "optim.total_updates=5"]
    return [*args, "save_every=2", "data.batch_size=2", "grad_accum=2", *extra]


@pytest.mark.slow
def test_finetune_stop_and_resume_is_exact(tmp_path: Path) -> None:
    """5 updates straight equal 2 updates, a stop and ``--resume``; on 10 examples (5 batches of 2 per epoch) the
    resumed part starts mid-epoch and its first update spans two epochs. Losses of every update and every final
    weight are bit-identical, and ``onepeace checkpoint export`` gives the same task model directory."""
    data = tmp_path / "train.tsv"
    data.write_text("\n".join((TASKS / "imagenet.tsv").read_text().splitlines()[:11]) + "\n")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(_imagenet(straight, data)) == 0
    assert main(_imagenet(split, data, "max_updates=2")) == 0
    assert (split / "latest").read_text().strip() == "step_00000002"
    assert main([*_imagenet(split, data), "--resume", str(split)]) == 0
    a, b = _rows(straight), _rows(split)
    assert sorted(a) == sorted(b) == list(range(1, 6))
    assert all(a[s]["total"] == b[s]["total"] and a[s]["grad_norm"] == b[s]["grad_norm"] for s in a)
    assert [a[s]["epoch"] for s in a] == [0, 0, 1, 1, 1]  # update 3 takes the last batch of epoch 0 and the first of 1
    wa = load_file(str(straight / "model" / "task_model.safetensors"))
    wb = load_file(str(split / "model" / "task_model.safetensors"))
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert main(["checkpoint", "export", str(straight), str(tmp_path / "exported")]) == 0
    we = load_file(str(tmp_path / "exported" / "task_model.safetensors"))
    assert set(we) == set(wa) and all(torch.equal(we[k], wa[k]) for k in wa)
    meta = json.loads((tmp_path / "exported" / "task.json").read_text())
    assert meta["task"] == "imagenet" and meta["updates"] == 5


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # DCP in one process, on purpose
def test_step_directory_without_marker_is_not_resumed(tmp_path: Path) -> None:
    """A sharded save that stopped before its marker (all data files there) is skipped, then replaced."""
    from onepeace.train import checkpoint as ckpt
    from onepeace.train.sharded import load_sharded, save_sharded

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)

    def step() -> None:
        module(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    def save(n: int) -> Path:
        return save_sharded(tmp_path, n, module, optimizer, None, rank=0, world_size=1, data_position={"n": n})

    step()
    first = save(1)
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    step()
    second = save(2)
    (second / ckpt.MARKER).unlink()  # as if the process died just before the marker
    (tmp_path / ckpt.LATEST).write_text("step_00000002\n")  # even a pointer naming it does not count
    assert (second / "state" / ".metadata").is_file() and ckpt.latest_checkpoint(tmp_path) == first
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    state = load_sharded(ckpt.latest_checkpoint(tmp_path), fresh, fresh_opt)
    assert state["step"] == 1 and state["data_position"] == {"n": 1}
    assert all(torch.equal(v, saved[k]) for k, v in fresh.state_dict().items())
    assert all(torch.equal(v, saved[k]) for k, v in ckpt.read_checkpoint_weights(tmp_path).items())
    step()
    save(3)  # the next complete save prunes the unfinished directory
    assert not second.exists() and ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_00000003"


STAGE1 = ROOT / "configs" / "tiny_stage1.yaml"
PAIRS = ROOT / "tests" / "data" / "tiny_pairs" / "image_text.tsv"
ONE_UPDATE = [f"data.paths=[{PAIRS}]", "data.batch_size=4", "grad_accum=2", "max_updates=1", "log_every=1"]


def _by_hand() -> list[dict[str, float]]:
    """Update 1 of the 2-rank run recomputed in this process, per rank: its two micro-batches through the objective
    at the starting weights under that rank's seed, averaged over the micro-batches. The contrastive keys of both
    ranks are recorded in a first pass and handed to each rank's second pass, as the all-gather does."""
    from onepeace.data.pretrain import PretrainDataConfig, build_pretrain_loader
    from onepeace.train.build import build_objective
    from onepeace.train.config import load_recipe
    from onepeace.train.core import step_seed

    cfg = load_recipe(STAGE1, ONE_UPDATE, data_config_type=PretrainDataConfig)
    objective = build_objective(cfg).train()

    def micro_batches(rank: int) -> list:
        loader = iter(build_pretrain_loader(cfg.data, rank, 2, cfg.seed, 0))
        step_seed(cfg.seed, rank, 0)
        return [objective(next(loader)) for _ in range(2)]

    keys: list[list[torch.Tensor]] = [[], []]
    with torch.no_grad():
        for rank in range(2):
            objective.gather, objective.rank = (lambda x, r=rank: keys[r].append(x) or x), 0
            micro_batches(rank)
        ranks = []
        for rank in range(2):
            both = iter([torch.cat(pair) for pair in zip(*keys)])  # call i gets [rank 0's keys; rank 1's keys]
            objective.gather = lambda x, both=both: next(both)
            objective.rank = rank
            outs = [out.scalars() for out in micro_batches(rank)]
            ranks.append({name: (outs[0][name] + outs[1][name]) / 2 for name in outs[0]})
    return ranks


@pytest.mark.dist
@pytest.mark.slow
def test_logged_loss_terms_are_means_over_ranks(tmp_path: Path) -> None:
    """Stage 1, 2 DDP ranks x 2 micro-batches of 4: the logged total, every loss term (contrastive and the four
    denoising ones) and every metric of update 1 are the means over both ranks of each rank's micro-batch mean."""
    args = ["pretrain", "--config", str(STAGE1), f"out_dir={tmp_path}", "strategy=ddp", *ONE_UPDATE]
    launch(["-m", "onepeace", *args], nproc=2, timeout=300, cwd=ROOT)
    (row,) = _rows(tmp_path).values()
    ranks = _by_hand()
    terms = {"itc_loss", "dcl_text_loss", "dcl_image_loss", "dcl_vl_text_loss", "dcl_vl_image_loss"}
    assert terms | {"total", "i2t_ncorrect", "t2i_ncorrect", "logit_scale_exp"} == set(ranks[0])
    for name in ranks[0]:
        expected = (ranks[0][name] + ranks[1][name]) / 2
        assert row[name] == pytest.approx(expected, rel=1e-5, abs=1e-6), name
    for name in terms:  # rank 0 alone would be a different number
        assert abs(ranks[0][name] - ranks[1][name]) > 1e-3, name


def _two_updates(run: Path, batch: int, *extra: str) -> list[str]:
    args = ["finetune", "--task", "imagenet", "--config", str(TINY / "imagenet.yaml"), f"out_dir={run}"]
    args += [f"data.train=[{TASKS / 'imagenet.tsv'}]", "data.valid=[]", "max_updates=2", f"data.batch_size={batch}"]
    return [*args, *extra]


@pytest.fixture(scope="module")
def one_process_of_eight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    run = tmp_path_factory.mktemp("one") / "run"
    assert main(_two_updates(run, 8)) == 0
    return load_file(str(run / "model" / "task_model.safetensors"))


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_accumulating_ranks_equal_one_process(
    strategy: str, one_process_of_eight: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """2 ranks x 2 micro-batches of 2, gradients synchronised on the second micro-batch only (DDP ``no_sync``,
    FSDP2 ``set_requires_gradient_sync``): rank r's micro-batches hold examples r, r + 2 and r + 4, r + 6 of the
    single process's batch of 8, so the mean over micro-batches and ranks is the batch mean and the weights after two
    AdamW updates agree up to float summation order (as in test_finetune_ddp)."""
    args = _two_updates(tmp_path, 2, "grad_accum=2", f"strategy={strategy}")
    launch(["-m", "onepeace", *args], nproc=2, timeout=300, cwd=ROOT)
    dist = load_file(str(tmp_path / "model" / "task_model.safetensors"))
    one = one_process_of_eight
    assert set(dist) == set(one)
    worst = max(float((one[k].float() - dist[k].float()).abs().max()) for k in one)
    assert worst < 1e-5, worst
    start = load_file(str(ROOT / "src" / "onepeace" / "assets" / "models" / "onepeace-small" / "model.safetensors"))
    moved = [k for k in start if f"model.{k}" in dist and not torch.equal(dist[f"model.{k}"], start[k].float())]
    assert len(moved) > 10  # the backbone was trained, identically on both sides


@pytest.mark.dist
def test_no_gradient_sync_on_accumulation_micro_steps(tmp_path: Path) -> None:
    """After a micro-step run with ``sync=False`` the ranks still hold their own gradients (DDP: different on the
    two ranks; FSDP2: nothing reduced into the sharded gradients yet); after the final micro-step every rank holds
    the rank mean of its accumulated gradient, as an unwrapped copy computes it."""
    launch([str(Path(__file__).with_name("dist_core_worker.py")), str(tmp_path)], nproc=2, timeout=180)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ddp = [r["ddp"] for r in ranks]
    for name, grad in ddp[0]["first"].items():
        assert not torch.allclose(grad, ddp[1]["first"][name]), name  # not averaged: each rank's own
    assert all(value is None for value in ranks[0]["fsdp"]["first"].values())
    for strategy in ("ddp", "fsdp"):
        for r in ranks:
            for name, grad in r[strategy]["final"].items():
                torch.testing.assert_close(grad, r[strategy]["reference"][name], atol=1e-6, rtol=1e-6)


@pytest.mark.dist
@pytest.mark.slow
def test_fsdp_finetune_stop_and_resume_is_exact(tmp_path: Path) -> None:
    """2 FSDP2 ranks: 4 updates straight equal 2 updates, a stop and ``--resume`` from the sharded checkpoint; the
    export of that checkpoint is the task model the run wrote."""
    data = tmp_path / "train.tsv"
    data.write_text("\n".join((TASKS / "imagenet.tsv").read_text().splitlines()[:13]) + "\n")
    straight, split = tmp_path / "straight", tmp_path / "split"

    def run(out: Path, *extra: str) -> None:
        args = _imagenet(out, data, "strategy=fsdp", "optim.total_updates=4", *extra)
        launch(["-m", "onepeace", *args], nproc=2, timeout=300, cwd=ROOT)

    run(straight)
    run(split, "max_updates=2")
    run(split, "--resume", str(split))
    assert (split / "step_00000002" / "state" / ".metadata").is_file()
    a, b = _rows(straight), _rows(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(a[s]["total"] == b[s]["total"] and a[s]["grad_norm"] == b[s]["grad_norm"] for s in a)
    wa = load_file(str(straight / "model" / "task_model.safetensors"))
    wb = load_file(str(split / "model" / "task_model.safetensors"))
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert main(["checkpoint", "export", str(split), str(tmp_path / "exported")]) == 0
    we = load_file(str(tmp_path / "exported" / "task_model.safetensors"))
    assert set(we) == set(wa) and all(torch.equal(we[k], wa[k]) for k in wa)
