"""One-command check of a CUDA machine: numerics against the CPU, the attention kernel, and training and encoding speed.

Rows, each timed and guarded on its own (a failing row records its error and the others still run):

* ``fixture``: the official tiny fixture (``tests/fixtures/official_tiny``) loaded through ``onepeace.load`` on the
  CPU and on the device in fp32 (TF32 off); max abs difference of the embedding and the hidden states per modality,
  device against CPU and device against the official reference outputs.
* ``sdpa``: which ``torch.nn.attention.SDPBackend`` accepts the model's kind of call (bf16, additive float bias with
  -inf at padded keys), each tried alone under ``sdpa_kernel``, with its max difference to the math kernel; and the
  kernel a bf16 forward of the benchmarked variant actually ran (read from the profiler).
* ``matmul``: the measured bf16 matmul rate (median of square matmuls, TFLOP/s), the peak that MFU is taken against.
* ``train_eager``, ``train_compiled``, ``train_fsdp``: the stage-1 pretraining step of ``benchmarks/train_step.py``
  (objective, optimizer, clipping) under bf16 autocast at the largest batch that fits (doubling from 1 up to 64,
  out-of-memory caught, found in eager mode; the other modes start there and halve on out-of-memory); samples/s,
  TFLOP/s and MFU. FLOPs per sample are counted with ``FlopCounterMode`` on one fp32 forward + backward at batch 1.
  Compiled: every fusion block compiled by ``onepeace.train.compile.compile_blocks`` (what ``compile: true`` does)
  with ``--compile-backend``. FSDP: ``train.distributed.wrap_model(..., "fsdp")`` with bf16 parameters and fp32
  reduction in a world-size-1 process group (nccl on CUDA, gloo on CPU).
* ``encode``: image / text / audio ``encode_*`` throughput under bf16 autocast.

Peak memory per row is ``torch.cuda.max_memory_allocated`` on CUDA (reset at the start of each row), and the
process's peak RSS so far on CPU. The JSON is printed and written to ``--out``; the exit status is 1 when a row
failed. ``--device cpu --tiny`` runs the same code with ``onepeace-tiny`` and batches of at most 2 in about a minute
on 2 CPU cores (``tests/test_gpu_check.py``).

Examples::

    python benchmarks/gpu_check.py --out result.json
    python benchmarks/gpu_check.py --device cpu --tiny --out result.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

import onepeace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encode import make_inputs  # noqa: E402
from gpu_numerics import fixture_row, sdpa_row  # noqa: E402
from train_step import count_step_flops, make_batch, stage1_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "official_tiny"
ROWS = ("fixture", "sdpa", "matmul", "flops", "train_eager", "train_compiled", "train_fsdp", "encode")
PROFILE = {  # settings of a full run and of --tiny
    False: dict(variant="onepeace-base", image=256, text=32, max_batch=64, warmup=2, reps=5, matmul=8192,
                matmul_reps=20, encode={"image": 64, "text": 256, "audio": 16}, audio_seconds=10.0),
    True: dict(variant="onepeace-tiny", image=64, text=16, max_batch=2, warmup=1, reps=2, matmul=256,
               matmul_reps=3, encode={"image": 4, "text": 8, "audio": 2}, audio_seconds=1.0),
}  # fmt: skip
TINY_DECODER = {"embed_dim": 32, "layers": 2, "heads": 2, "ffn_dim": 96}
"""Decoder of the official tiny fixture, used with ``--tiny`` instead of the 768-wide official decoder."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="where to write the JSON")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument(
        "--tiny", action="store_true", help="onepeace-tiny and batches of at most 2 (about a minute on 2 CPU cores)"
    )
    p.add_argument("--fixture", type=Path, default=FIXTURE, help="the official tiny fixture directory")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled row")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="rows to run (default: all)")
    args = p.parse_args(argv)
    if any(r.startswith("train_") for r in args.rows) and "flops" not in args.rows:
        args.rows.append("flops")  # the training rows need the FLOP count
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available (use --device cpu --tiny for the CPU run)")
    if args.device.type not in ("cuda", "cpu"):
        p.error(f"--device must be cuda or cpu, got {args.device}")
    return args


# ------------------------------------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    """Wait for the device's queued work (so that wall time covers it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """Release cached memory after a row (or an out-of-memory attempt)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    """Start a new CUDA peak-memory window (no-op on CPU, where the process peak RSS is reported)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int:
    """Bytes: CUDA max allocated since the row started, or the process's peak RSS so far on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> list[float]:
    """Wall seconds of each of ``repeats`` calls of ``fn``, device work included."""
    out = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return out


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error of the CUDA caching allocator."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)


def run_row(name: str, fn: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Run one row: its result plus ``ok``, ``error``, ``seconds`` and ``peak_memory_bytes``; errors are kept."""
    log(f"{name} ...")
    free(device)
    reset_peak(device)
    start = time.perf_counter()
    try:
        row: dict[str, Any] = {"ok": True, "error": None} | fn()
    except Exception as exc:  # noqa: BLE001 - a row's failure is a result; the other rows still run
        row = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6)}
    row["seconds"] = time.perf_counter() - start
    row.setdefault("peak_memory_bytes", peak_memory(device))  # a row may report the peak of its timed part
    log(f"{name}: {'ok' if row['ok'] else row['error']} ({row['seconds']:.1f} s)")
    free(device)
    return row


def log(message: str) -> None:
    """Progress on stderr (stdout carries the JSON)."""
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- matmul row
def matmul_row(args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    n = settings["matmul"]
    a, b = (torch.randn(n, n, device=args.device, dtype=torch.bfloat16) for _ in range(2))
    timed(lambda: a @ b, args.device, 2)
    seconds = timed(lambda: a @ b, args.device, settings["matmul_reps"])
    rates = [2 * n**3 / s / 1e12 for s in seconds]
    return {"size": n, "dtype": "bfloat16", "tflops": statistics.median(rates), "tflops_all": rates}


# ------------------------------------------------------------------------------------------------- train rows
def training_setup(settings: dict[str, Any], device: torch.device) -> tuple[Any, torch.nn.Module]:
    """The stage-1 recipe and its objective (train mode) on ``device``."""
    from onepeace.model.decoder import DecoderConfig
    from onepeace.train.build import build_objective

    cfg = stage1_config(settings["variant"], settings["image"])
    if settings["variant"] == "onepeace-tiny":
        cfg = replace(cfg, model=replace(cfg.model, decoder=DecoderConfig(**TINY_DECODER)))
    return cfg, build_objective(cfg).to(device).train()


def step_fn(module: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Any, device: torch.device, clip: float):
    """One update under bf16 autocast (forward, backward, clipping, AdamW, logit-scale clamp); returns the loss."""
    from onepeace.train.core import autocast  # the training core's bf16 autocast
    from onepeace.train.optim import clamp_logit_scale_

    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast("bf16", device):
            losses = module(batch)
        losses.total.backward()
        torch.nn.utils.clip_grad_norm_(params, clip or float("inf"))
        optimizer.step()
        clamp_logit_scale_(module)
        return losses.total.detach()

    return step


def fits(module, optimizer, settings, device, clip, batch_size: int) -> bool:
    """Whether one step at ``batch_size`` runs (False on out-of-memory, other errors propagate)."""
    try:
        batch = make_batch(batch_size, settings["image"], settings["text"], seed=0).to(device)
        step_fn(module, optimizer, batch, device, clip)()
        sync(device)
        return True
    except RuntimeError as exc:
        if not is_oom(exc):
            raise
    free(device)
    return False


def largest_batch(module, optimizer, settings, device, clip, start: int | None = None) -> tuple[int, dict[str, str]]:
    """Double the batch from 1 (or halve from ``start``) until the largest that fits; ``--tiny`` caps it."""
    tried: dict[str, str] = {}
    if start is not None:  # halve from a batch known to fit another mode
        size = start
        while size >= 1 and not fits(module, optimizer, settings, device, clip, size):
            tried[str(size)], size = "out of memory", size // 2
        if size < 1:
            raise RuntimeError("batch 1 does not fit in memory")
        tried[str(size)] = "ok"
        return size, tried
    size, best = 1, 0
    while size <= settings["max_batch"] and fits(module, optimizer, settings, device, clip, size):
        tried[str(size)], best, size = "ok", size, size * 2
    if size <= settings["max_batch"]:
        tried[str(size)] = "out of memory"
    if best == 0:
        raise RuntimeError("batch 1 does not fit in memory")
    return best, tried


def measure_training(module, cfg, settings, device, flops_per_sample: float, peak_tflops: float | None,
                     start_batch: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Find the batch, then time ``reps`` steps after ``warmup`` untimed ones; samples/s, TFLOP/s, MFU, losses."""
    from onepeace.train.optim import build_optimizer

    optimizer = build_optimizer(module, cfg.optim)
    clip = cfg.optim.clip_grad_norm
    search = time.perf_counter()
    batch_size, tried = largest_batch(module, optimizer, settings, device, clip, start_batch)
    search = time.perf_counter() - search
    batch = make_batch(batch_size, settings["image"], settings["text"], seed=1).to(device)
    step = step_fn(module, optimizer, batch, device, clip)
    reset_peak(device)  # the peak of the chosen batch, not of an attempt that ran out of memory
    warmup = timed(step, device, settings["warmup"])
    losses: list[float] = []
    seconds = timed(lambda: losses.append(float(step())), device, settings["reps"])
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"a timed step gave a non-finite loss: {losses}")
    rate = batch_size / statistics.median(seconds)
    tflops = rate * flops_per_sample / 1e12
    return {
        "batch": batch_size, "batches_tried": tried, "batch_search_seconds": search, "warmup_seconds": warmup,
        "step_seconds": seconds, "peak_memory_bytes": peak_memory(device),
        "samples_per_second": rate, "tflops": tflops, "mfu": tflops / peak_tflops if peak_tflops else None,
        "gflop_per_sample": flops_per_sample / 1e9, "losses": losses,
    }  # fmt: skip


def step_flops(settings: dict[str, Any], device: torch.device) -> float:
    """Training FLOPs per sample: one fp32 forward + backward of a fresh objective at batch 1 (the FLOPs grow
    linearly with the batch but for the ``B x B`` contrastive logits, a few MFLOP at batch 64)."""
    _, objective = training_setup(settings, device)
    counted = count_step_flops(objective, make_batch(1, settings["image"], settings["text"], seed=0).to(device))
    return counted.total


def train_row(args, settings, peak: float | None, flops: float, mode: str, start: int | None) -> dict[str, Any]:
    """One training row: ``mode`` is ``eager``, ``compiled`` or ``fsdp``."""
    cfg, objective = training_setup(settings, args.device)
    extra: dict[str, Any] = {}
    if mode == "compiled":
        from onepeace.train.compile import compile_blocks  # what ``compile: true`` applies

        extra = {"compiled_blocks": compile_blocks(objective, backend=args.compile_backend)}
        torch._dynamo.reset()  # fresh counters and caches: the graphs below are this row's
    with process_group(args.device) if mode == "fsdp" else contextlib.nullcontext():
        if mode == "fsdp":
            from onepeace.train.distributed import wrap_model

            objective = wrap_model(objective, "fsdp", param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            extra = {"param_dtype": "bfloat16", "reduce_dtype": "float32", "world_size": 1}
        result = measure_training(objective, cfg, settings, args.device, flops, peak, start) | extra
    if mode == "compiled":  # every distinct block input (shape, dtype, grad mode, drop-path rate) is one graph
        from torch._dynamo.utils import counters

        result["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
        limit = getattr(torch._dynamo.config, "recompile_limit", None)  # cache_size_limit before torch 2.8
        result["recompile_limit"] = limit if limit is not None else torch._dynamo.config.cache_size_limit
    return result


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """A world-size-1 process group (nccl on CUDA, gloo on CPU) for the duration of the block."""
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(str(Path(tmp) / "store"), 1)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------- encode row
@torch.inference_mode()
def encode_row(args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    model = onepeace.load(settings["variant"], device=args.device)
    opts = argparse.Namespace(seed=0, audio_seconds=settings["audio_seconds"], text_tokens=settings["text"])
    out: dict[str, Any] = {"precision": "bf16 autocast"}
    for m in ("image", "text", "audio"):
        batch = settings["encode"][m]
        inputs = tuple(t.to(args.device) for t in make_inputs(model, m, batch, opts))
        call = partial(getattr(model, f"encode_{m}"), *inputs)
        reset_peak(args.device)
        with torch.autocast(args.device.type, dtype=torch.bfloat16):
            timed(call, args.device, settings["warmup"])
            seconds = timed(call, args.device, settings["reps"])
        rate = batch / statistics.median(seconds)
        out[m] = {
            "batch": batch,
            "items_per_second": rate,
            "seconds": seconds,
            "peak_memory_bytes": peak_memory(args.device),
        }
        if m == "audio":
            out[m]["audio_seconds_per_second"] = rate * settings["audio_seconds"]
    return out


# ------------------------------------------------------------------------------------------------------- main
def environment(device: torch.device) -> dict[str, Any]:
    """torch, CUDA and device facts needed to read the numbers."""
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {"cuda": torch.version.cuda, "gpu": props.name, "gpu_memory_bytes": props.total_memory,
                "capability": f"{props.major}.{props.minor}"}  # fmt: skip
    else:
        env |= {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    return env


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The chosen rows in order; training rows use the matmul peak, the FLOP count and the eager batch when run."""
    settings = PROFILE[args.tiny]
    wall = time.perf_counter()
    rows: dict[str, dict[str, Any]] = {}

    def add(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if name in args.rows:
            rows[name] = run_row(name, fn, args.device)

    add("fixture", lambda: fixture_row(args.fixture, args.device))
    add("sdpa", lambda: sdpa_row(args.device, settings["variant"], settings["text"], settings["image"]))
    add("matmul", lambda: matmul_row(args, settings))
    add("flops", lambda: {"per_sample": step_flops(settings, args.device)})
    peak = rows.get("matmul", {}).get("tflops")
    flops = rows.get("flops", {}).get("per_sample") or float("nan")
    add("train_eager", lambda: train_row(args, settings, peak, flops, "eager", None))
    start = rows.get("train_eager", {}).get("batch")
    add("train_compiled", lambda: train_row(args, settings, peak, flops, "compiled", start))
    add("train_fsdp", lambda: train_row(args, settings, peak, flops, "fsdp", start))
    eager = rows.get("train_eager", {}).get("samples_per_second")
    if eager and rows.get("train_compiled", {}).get("samples_per_second"):
        rows["train_compiled"]["speedup_vs_eager"] = rows["train_compiled"]["samples_per_second"] / eager
    add("encode", lambda: encode_row(args, settings))
    return {
        "settings": {"device": str(args.device), "tiny": args.tiny, "compile_backend": args.compile_backend} | settings,
        "environment": environment(args.device),
        "peak_memory": "torch.cuda.max_memory_allocated per row" if args.device.type == "cuda" else "process peak RSS",
        "rows": rows,
        "errors": {name: row["error"] for name, row in rows.items() if not row["ok"]},
        "wall_seconds": time.perf_counter() - wall,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check, print the JSON and write it to ``--out``; 1 when any row failed."""
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    log(f"wrote {args.out} ({result['wall_seconds']:.0f} s); failed rows: {', '.join(result['errors']) or 'none'}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
