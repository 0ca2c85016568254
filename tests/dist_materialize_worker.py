"""Meta-device construction under 2 gloo ranks; run under ``torch.distributed.run``.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 dist_materialize_worker.py OUT_DIR
STEP_DIR NATIVE_DIR``. For every case of :data:`CASES` the tiny objective is built by
:func:`onepeace.train.build.build_for_ranks` (meta construction, FSDP2 sharding or DDP, materialisation, starting
weights read shard by shard) and its full state is written: ``OUT_DIR/<case>.rank<r>.pt`` (FSDP: gathered on rank
0; DDP: every rank's own module), with the number of elements this rank holds and every parameter's
``requires_grad`` (FSDP: also the gradient of ``logit_scale`` after a backward of ``(rank + 1) * logit_scale``); a
start that does not fit writes the :class:`CheckpointError` message instead. STEP_DIR is a
stage-1 training step directory, NATIVE_DIR a backbone model directory (no decoder: it does not fit).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from onepeace.errors import CheckpointError
from onepeace.train import distributed as D
from onepeace.train.build import build_for_ranks
from onepeace.train.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def cases(step_dir: str, native_dir: str) -> dict[str, tuple[str, list[str]]]:
    """Case name -> (recipe, overrides)."""
    stage1, stage2 = str(ROOT / "configs/tiny_stage1.yaml"), str(ROOT / "configs/tiny_stage2.yaml")
    return {
        "fsdp_scratch": (stage1, ["strategy=fsdp"]),
        "ddp_scratch": (stage1, ["strategy=ddp"]),
        "fsdp_start": (stage1, ["strategy=fsdp", f"model.init_from={step_dir}"]),
        "fsdp_stage2": (stage2, ["strategy=fsdp", f"model.init_from={step_dir}", "model.audio_ffn_init=text"]),
        "ddp_stage2": (stage2, ["strategy=ddp", f"model.init_from={step_dir}"]),
        "fsdp_no_decoder": (stage1, ["strategy=fsdp", f"model.init_from={native_dir}"]),
    }


#: Fine-tuning cases: name -> (task, strategy, overrides); onepeace-small start, 128-pixel images (resampled
#: tables, copied per layer for grounding).
TASK_CASES: dict[str, tuple[str, str, list[str]]] = {
    "task_refcoco_fsdp": ("refcoco", "fsdp", ["model.image_size=128"]),
    "task_vqa_ddp": ("vqa", "ddp", ["model.image_size=128", "model.num_classes=8"]),
}


def task_recipe(task: str, strategy: str, overrides: list[str]):
    from onepeace.finetune.config import parse_finetune_recipe

    extra = ["model.init_from=onepeace-small", f"strategy={strategy}", *overrides]
    return parse_finetune_recipe("optim: {total_updates: 2}", extra, task)


def _task_cases(info: D.DistInfo, out: Path) -> None:
    from onepeace.finetune.build import build_task_for_ranks

    for name, spec in TASK_CASES.items():
        cfg = task_recipe(*spec)
        task, wrapped = build_task_for_ranks(cfg, info)
        if cfg.strategy == "fsdp":
            state = D.full_model_state(task)
        else:
            state = {k: v.detach().clone() for k, v in wrapped.module.state_dict().items()}
        grads = {n: p.requires_grad for n, p in task.named_parameters()}
        torch.save({"state": state, "requires_grad": grads}, out / f"{name}.rank{info.rank}.pt")


def main(out_dir: str, step_dir: str, native_dir: str) -> None:
    info = D.init_distributed("gloo")
    out = Path(out_dir)
    _task_cases(info, out)
    _objective_cases(info, out, step_dir, native_dir)
    D.cleanup()  # the modules are unreachable now: the process group goes down before interpreter exit


def _objective_cases(info: D.DistInfo, out: Path, step_dir: str, native_dir: str) -> None:
    for name, (recipe, overrides) in cases(step_dir, native_dir).items():
        cfg = load_recipe(recipe, overrides)
        try:
            objective, wrapped = build_for_ranks(cfg, info)
        except CheckpointError as exc:
            torch.save({"error": str(exc)}, out / f"{name}.rank{info.rank}.pt")
            continue
        held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in objective.parameters())
        if cfg.strategy == "fsdp":
            state = D.full_model_state(objective)
        else:
            state = {k: v.detach().clone() for k, v in wrapped.module.state_dict().items()}
        grads = {n: p.requires_grad for n, p in objective.named_parameters()}
        record = {"state": state, "held": held, "requires_grad": grads}
        if cfg.strategy == "fsdp":  # the replicated logit_scale keeps its gradient averaging over ranks
            (objective.model.logit_scale * (info.rank + 1)).backward()
            record["logit_scale_grad"] = float(objective.model.logit_scale.grad)
        torch.save(record, out / f"{name}.rank{info.rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:4])
