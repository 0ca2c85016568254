"""Peak host memory (resident set) per rank of a pretraining start-up: building the objective and its first update.

Runs the recipe (default ``configs/pretrain_base_stage1.yaml``: onepeace-base stage 1, from scratch) as one process
(``strategy: none``) and as 2 gloo ranks under FSDP2, each with the eager construction (every rank builds and
initialises the whole objective on the host, then shards it) and with the meta-device construction of
:func:`onepeace.train.build.build_for_ranks` (FSDP2 shards the meta module, every rank allocates and initialises
only its shards). Each process records its peak resident set so far (``ru_maxrss``) after imports, after the
objective is built and wrapped, and after the forward, the backward and the AdamW step of one update on a batch of
``--batch`` image-text pairs of ``tests/data/tiny_pairs``. Precision is fp32 (bf16 matmuls are very slow on CPUs
without bf16 units); everything else is the recipe's (activation checkpointing, 256-pixel images, the decoder).

Example (about 4 minutes on 2 cores)::

    python benchmarks/startup_memory.py --json startup_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = "tests/data/tiny_pairs/image_text.tsv"
RUNS = (("1 process", 1, "none", "eager"), ("2 ranks FSDP", 2, "fsdp", "eager"), ("2 ranks FSDP", 2, "fsdp", "meta"))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def worker(args: argparse.Namespace) -> None:
    """One rank: build (eager or meta), one update, peak resident set at each point into ``OUT/rank<r>.json``."""
    from onepeace.data.pretrain import PretrainDataConfig, build_pretrain_loader
    from onepeace.train import distributed as D
    from onepeace.train.build import build_for_ranks, build_objective
    from onepeace.train.config import load_recipe
    from onepeace.train.optim import build_optimizer
    from onepeace.train.schedule import resolve_total

    peaks = {"imports": _peak_mb()}
    overrides = [f"strategy={args.strategy}", "precision=fp32", f"data.paths=[{DATA}]", "data.format=tsv"]
    overrides += [f"data.batch_size={args.batch}", "data.num_workers=0", "max_updates=1"]
    cfg = load_recipe(args.config, overrides, data_config_type=PretrainDataConfig)
    dist = D.init_distributed("gloo")
    gather = D.all_gather_with_grad if cfg.loss.contrastive_gather == "with_grad" else D.all_gather_no_grad
    if args.path == "meta":
        objective, wrapped = build_for_ranks(cfg, dist, gather, **D.wrap_kwargs(cfg))
    else:
        objective = build_objective(cfg, gather, dist.rank).to(dist.device)
        if cfg.activation_checkpointing:
            D.apply_activation_checkpointing(objective)
        wrapped = D.wrap_model(objective, cfg.strategy, **D.wrap_kwargs(cfg))
    peaks["built"] = _peak_mb()
    loader = build_pretrain_loader(cfg.data, dist.rank, dist.world_size, cfg.seed, 0)
    optimizer = build_optimizer(objective, resolve_total(cfg.optim, len(loader), cfg.grad_accum))
    wrapped.train()
    out = wrapped(next(iter(loader)).to(dist.device))
    peaks["forward"] = _peak_mb()
    out.total.backward()
    peaks["backward"] = _peak_mb()
    optimizer.step()
    peaks["update"] = _peak_mb()
    params = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in objective.parameters())
    record = {"rank": dist.rank, "params": params, "peak_mb": peaks, "loss": float(out.total.detach())}
    Path(args.out, f"rank{dist.rank}.json").write_text(json.dumps(record))
    D.cleanup()


def _launch(config: str, nproc: int, strategy: str, path: str, batch: int, out: Path) -> list[dict]:
    me = [str(Path(__file__).resolve()), "--worker", str(out), "--config", config, "--strategy", strategy]
    me += ["--path", path, "--batch", str(batch)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if nproc == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *me]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/pretrain_base_stage1.yaml")
    parser.add_argument("--batch", type=int, default=2, help="image-text pairs per rank in the update (default 2)")
    parser.add_argument("--paths", default="eager,meta", help="constructions to run: eager, meta or both")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--path", default="eager", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.out = args.worker
        worker(args)
        return 0
    wanted = set(args.paths.split(","))
    rows = []
    print(f"{args.config}, fp32, batch {args.batch} per rank; peak resident set per process in MB")
    head = ("run", "construction", "rank", "params held", "imports", "built", "forward", "backward", "update")
    print("{:14s} {:12s} {:>4s} {:>12s} {:>8s} {:>8s} {:>8s} {:>8s} {:>8s}".format(*head))
    for label, nproc, strategy, path in RUNS:
        if path not in wanted:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            ranks = _launch(args.config, nproc, strategy, path, args.batch, Path(tmp))
        for r in ranks:
            p = r["peak_mb"]
            rows.append({"run": label, "processes": nproc, "strategy": strategy, "construction": path, **r})
            print(
                f"{label:14s} {path:12s} {r['rank']:4d} {r['params']:12,d} "
                f"{p['imports']:8.0f} {p['built']:8.0f} {p['forward']:8.0f} {p['backward']:8.0f} {p['update']:8.0f}"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
