"""FSDP2 under the bf16 policy on 2 gloo ranks, and the process-group timeout; run under ``torch.distributed.run``.

Usage: ``ONEPEACE_DIST_TIMEOUT=123 python -m torch.distributed.run --standalone --nproc_per_node 2
dist_speed_worker.py OUT_DIR``. Every rank writes ``OUT_DIR/rank<r>.pt`` with:

* ``timeout``: seconds of the default group's timeout (gloo backend options), after a barrier;
* for stage 1 and 2, ``<stage>.total`` and ``<stage>.term.<name>``: the losses of one forward + backward of the tiny
  objective (:func:`dist_pretrain_worker.build_tiny_objective`) wrapped with ``wrap_model(..., "fsdp",
  **wrap_kwargs(TrainConfig(precision="bf16")))`` under bf16 autocast, as the pretraining loop runs it;
  ``<stage>.seen.<module>``: the dtype codes (see :data:`DTYPE_CODES`) of the weight each watched module holds while
  its forward runs (the all-gathered parameter); ``<stage>.grad_dtype``: dtype code of the sharded gradients.
"""

from __future__ import annotations

import sys
from pathlib import Path

import dist_pretrain_worker as W
import torch
import torch.distributed as dist

from onepeace.train import distributed as D
from onepeace.train.config import TrainConfig

DTYPE_CODES = {torch.float32: 32, torch.bfloat16: 16}
WATCHED = {
    1: (
        "model.encoder.layers.0.attn.q_proj",
        "model.adapters.image.stem.conv1",
        "decoder.encoder.layers.1.ffn.text.out",
    ),
    2: ("model.encoder.layers.1.ffn.audio.out", "model.adapters.audio.extractor.0.conv", "decoder.heads.audio"),
}
"""Modules whose weight dtype is recorded inside their forward: a fusion layer, a stem, a decoder part."""


def run_stage(stage: int, rank: int) -> dict[str, torch.Tensor]:
    """One bf16-policy FSDP step of a stage on this rank's half of the global batch."""
    objective = W.build_tiny_objective(stage, rank)
    modules = dict(objective.named_modules())
    seen: dict[str, list[int]] = {name: [] for name in WATCHED[stage]}
    for name in WATCHED[stage]:
        modules[name].register_forward_pre_hook(lambda m, args, n=name: seen[n].append(DTYPE_CODES[m.weight.dtype]))
    kwargs = D.wrap_kwargs(TrainConfig(stage=stage, precision="bf16", strategy="fsdp"))
    wrapped = D.wrap_model(objective, "fsdp", **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = wrapped(W.rank_slice(W.global_batch(stage), rank))
    out.total.backward()
    grads = {DTYPE_CODES[p.grad.dtype] for p in objective.parameters() if p.grad is not None}
    results = {f"{stage}.total": out.total.detach().float()}
    results.update({f"{stage}.term.{k}": v.detach().float() for k, v in out.terms.items()})
    results.update({f"{stage}.seen.{k}": torch.tensor(v) for k, v in seen.items()})
    results[f"{stage}.grad_dtype"] = torch.tensor(sorted(grads))
    return results


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    info = D.init_distributed("gloo")
    D.barrier()
    backend = dist.group.WORLD._get_backend(torch.device("cpu"))
    results: dict[str, torch.Tensor] = {"timeout": torch.tensor(backend.options._timeout.total_seconds())}
    for stage in (1, 2):
        results.update(run_stage(stage, info.rank))
    D.barrier()
    torch.save(results, out_dir / f"rank{info.rank}.pt")
    D.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
