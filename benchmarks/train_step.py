"""Throughput of one full stage-1 pretraining step on CPU, in fp32 and in bf16 autocast.

One step is what an update of ``onepeace pretrain`` does for one batch: the forward of
:class:`~onepeace.train.objectives.PretrainObjective` (text, image and joint passes, the three masked
passes through encoder and decoder, the contrastive and denoising losses), the backward, gradient-norm
clipping and the AdamW step. The objective is built like :func:`~onepeace.train.build.build_objective`
builds it for a stage-1 recipe: the variant's backbone restricted to text + image
(``ModelConfig.backbone_config(1)``), the official decoder (768 wide, 2 layers, 12 heads, GeGLU 2048) and
the default loss weights; the optimizer is :func:`~onepeace.train.optim.build_optimizer` with the paper's
settings. Inputs are random: normalised-pixel noise images, random token ids, and the masks of the four
denoising views drawn with :mod:`onepeace.data.masking` at the default ratios (spec §5.4).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` around one fp32 forward *and*
backward of the same batch (matmuls, convolutions and the CPU fused attention kernel, whose forward and
backward formulas are supplied here; 2 FLOPs per multiply-accumulate). The peak is measured in the same
run as the median rate of a large fp32 matmul, and model-FLOPs utilisation (MFU) is the achieved rate
divided by that measured peak.

fp32 is timed at ``--batch`` (default 8). bf16 autocast is timed at ``--bf16-batch`` (default 1) with
fewer steps, because on CPUs without bf16 matrix instructions its matmuls are 10 to 100 times
slower than fp32 (one bf16 step at batch 8 took 24 minutes on a 2-core CPU where fp32 took about one);
fp32 is then also timed at that batch, so the bf16/fp32 ratio compares equal batches.

``--compile`` adds, after the eager rows, a row for every fp32 row with each fusion block compiled
(:func:`onepeace.train.compile.compile_blocks`, inductor) in the same run and on the same objective; its untimed
warm-up steps (at least one) include the compilation, whose wall time is printed. The last column is each row's
median over the eager fp32 median at the same batch (bf16/fp32, compiled/eager).

Example::

    python benchmarks/train_step.py --threads 2 --json train_step.json
    python benchmarks/train_step.py --variant onepeace-small --batch 2 --precisions fp32 --compile
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from onepeace.data.batch import PretrainBatch
from onepeace.data.masking import (
    collate_view,
    complementary_patch_mask,
    joint_text_mask,
    random_patch_mask,
    whole_word_mask,
    with_cls,
)
from onepeace.train.build import build_objective
from onepeace.train.config import ModelConfig, OptimConfig, TrainConfig
from onepeace.train.objectives import PretrainObjective
from onepeace.train.optim import build_optimizer, clamp_logit_scale_

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encode import environment, environment_line, fmt_number, log, precision_context, sdpa_cpu_flops  # noqa: E402

PRECISIONS = ("fp32", "bf16")
EOS_ID = 2
TOKEN_RANGE = (4, 50000)
PATCH_SIZE = 16
WORD_START_PROB = 0.7
"""Fraction of random tokens that begin a word (GPT-2 BPE captions are mostly one token per word)."""


@dataclass
class Row:
    """One measured (precision, batch) pair: per-repeat throughputs in samples/s and the FLOPs per sample."""

    precision: str
    batch: int
    warmup: int
    repeats: int
    samples_per_second: list[float]
    gflop_per_sample: float
    peak_gflops: float
    compiled: bool = False

    @property
    def median(self) -> float:
        """Median of the per-repeat throughputs (samples/s)."""
        return statistics.median(self.samples_per_second)

    @property
    def seconds_per_step(self) -> float:
        """Wall seconds of one step at the median throughput."""
        return self.batch / self.median

    @property
    def achieved_gflops(self) -> float:
        """Training FLOPs per sample times the median throughput, in GFLOP/s."""
        return self.gflop_per_sample * self.median

    @property
    def mfu(self) -> float:
        """Achieved GFLOP/s over the measured fp32 matmul peak."""
        return self.achieved_gflops / self.peak_gflops


@dataclass(frozen=True)
class Plan:
    """One row to measure: precision, batch size, untimed and timed steps."""

    precision: str
    batch: int
    warmup: int
    repeats: int
    compiled: bool = False


@dataclass
class FlopCount:
    """Counted FLOPs of one step on the whole batch, split into forward and backward."""

    forward: int
    backward: int

    @property
    def total(self) -> int:
        """Forward plus backward FLOPs."""
        return self.forward + self.backward


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--variant", default="onepeace-base", help="model variant (random initialisation)")
    p.add_argument("--batch", type=int, default=8, help="image-text pairs per fp32 step")
    p.add_argument("--repeats", type=int, default=3, help="timed fp32 steps per row")
    p.add_argument("--warmup", type=int, default=1, help="untimed fp32 steps before the timed ones, per row")
    p.add_argument(
        "--bf16-batch",
        type=int,
        default=1,
        help="image-text pairs per bf16 step; when it differs from --batch, fp32 is also measured at this batch",
    )
    p.add_argument("--bf16-repeats", type=int, default=2, help="timed bf16 steps")
    p.add_argument(
        "--bf16-warmup",
        type=int,
        default=0,
        help="untimed bf16 steps (the fp32 rows run first and already create the optimizer state)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument("--compile", action="store_true", help="also time every fp32 row with each fusion block compiled")
    p.add_argument("--image-size", type=int, default=256, help="image side in pixels (a multiple of 16)")
    p.add_argument("--text-tokens", type=int, default=32, help="token ids per text, including eos")
    p.add_argument("--matmul-size", type=int, default=4096, help="side of the square fp32 matmul giving the peak")
    p.add_argument("--matmul-repeats", type=int, default=5, help="timed matmuls; the peak is their median rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs and masks")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results here")
    args = p.parse_args(argv)
    for name in ("batch", "repeats", "bf16_batch", "bf16_repeats", "matmul_size", "matmul_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.text_tokens < 2:
        p.error("--text-tokens must be at least 2 (one word and the eos)")
    if args.warmup < 0 or args.bf16_warmup < 0:
        p.error("--warmup and --bf16-warmup must be >= 0")
    if args.image_size < PATCH_SIZE or args.image_size % PATCH_SIZE:
        p.error(f"--image-size must be a positive multiple of {PATCH_SIZE}")
    return args


def plan_rows(args: argparse.Namespace) -> list[Plan]:
    """The rows to measure, fp32 first: fp32 at ``--batch``; for bf16 also fp32 at ``--bf16-batch`` when it differs
    (so that bf16 is compared with fp32 at the same batch), then bf16 at ``--bf16-batch``."""
    plans = []
    if "fp32" in args.precisions:
        plans.append(Plan("fp32", args.batch, args.warmup, args.repeats))
        if "bf16" in args.precisions and args.bf16_batch != args.batch:
            plans.append(Plan("fp32", args.bf16_batch, args.warmup, args.repeats))
    if "bf16" in args.precisions:
        plans.append(Plan("bf16", args.bf16_batch, args.bf16_warmup, args.bf16_repeats))
    if args.compile:  # after every eager row: compiling changes the objective in place
        plans += [Plan(p.precision, p.batch, max(1, p.warmup), p.repeats, True) for p in plans if p.precision == "fp32"]
    return plans


def stage1_config(variant: str, image_size: int) -> TrainConfig:
    """A stage-1 recipe of ``variant`` with the paper's model and optimiser settings and the official decoder."""
    return TrainConfig(
        stage=1,
        precision="fp32",
        model=ModelConfig(variant=variant, image_size=image_size),
        optim=OptimConfig(total_updates=200_000, warmup_updates=3000),
    )


def make_batch(batch: int, image_size: int, text_tokens: int, seed: int) -> PretrainBatch:
    """A random stage-1 batch shaped like the loader's, with the four denoising views at the default ratios.

    Every text has ``text_tokens`` ids (eos last, so no padding); word starts are random with probability
    :data:`WORD_START_PROB` (the first token always starts a word).
    """
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    low, high = TOKEN_RANGE
    text = torch.randint(low, high + 1, (batch, text_tokens), generator=gen)
    text[:, -1] = EOS_ID
    image = torch.randn(batch, 3, image_size, image_size, generator=gen)
    patches = (image_size // PATCH_SIZE) ** 2
    masks: dict[str, list[np.ndarray]] = {"text": [], "vl_text": [], "image": [], "vl_image": []}
    for _ in range(batch):
        starts = rng.random(text_tokens) < WORD_START_PROB
        starts[0] = True
        text_mask = whole_word_mask(starts, 0.15, rng)
        image_mask = random_patch_mask(patches, 0.75, rng)
        masks["text"].append(with_cls(text_mask))
        masks["vl_text"].append(with_cls(joint_text_mask(text_tokens, 0.4, text_mask, rng)))
        masks["image"].append(with_cls(image_mask))
        masks["vl_image"].append(with_cls(complementary_patch_mask(image_mask, 0.6875, rng)))
    widths = {"text": text_tokens + 1, "vl_text": text_tokens + 1, "image": patches + 1, "vl_image": patches + 1}
    views = {name: collate_view(rows, widths[name]) for name, rows in masks.items()}
    return PretrainBatch(text=text, image=image, views=views, num_samples=batch)


def train_step(
    objective: PretrainObjective,
    optimizer: torch.optim.Optimizer,
    batch: PretrainBatch,
    precision: str,
    clip_grad_norm: float,
) -> float:
    """One update as the training loop does it: forward, backward, clip, AdamW step, logit-scale clamp.

    Returns the total loss (for a sanity check that the step computed something finite).
    """
    optimizer.zero_grad(set_to_none=True)
    with precision_context(precision):
        losses = objective(batch)
    losses.total.backward()
    params = [p for p in objective.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, clip_grad_norm or float("inf"))
    optimizer.step()
    clamp_logit_scale_(objective)
    return float(losses.total.detach())


def _sdpa_cpu_backward_flops(
    grad_out: Sequence[int], q: Sequence[int], k: Sequence[int], v: Sequence[int], *args: Any, **kwargs: Any
) -> int:
    """FLOPs of the CPU fused attention backward without recomputation: four matmuls, 2 per MAC.

    ``dV = P^T dO`` and ``dP = dO V^T`` (``s_q * s_k * d_v`` MACs each), ``dQ = dS K`` and ``dK = dS^T Q``
    (``s_q * s_k * d`` MACs each): twice the forward, the rule torch's counter uses for its other attention
    kernels.
    """
    b, h, s_q, d = q
    s_k, d_v = k[-2], v[-1]
    return 4 * b * h * s_q * s_k * d + 4 * b * h * s_q * s_k * d_v


def attention_formulas() -> dict[Any, Any]:
    """Formulas for the CPU attention kernels, which this torch's ``FlopCounterMode`` does not count."""
    mapping: dict[Any, Any] = {}
    forward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None:
        mapping[forward] = sdpa_cpu_flops
    if backward is not None:
        mapping[backward] = _sdpa_cpu_backward_flops
    return mapping


def count_step_flops(objective: PretrainObjective, batch: PretrainBatch) -> FlopCount:
    """Forward and backward FLOPs of one fp32 step on ``batch`` (the gradients are discarded)."""
    counter = FlopCounterMode(display=False, custom_mapping=attention_formulas())
    with counter:
        losses = objective(batch)
        forward = counter.get_total_flops()
        losses.total.backward()
        total = counter.get_total_flops()
    objective.zero_grad(set_to_none=True)
    return FlopCount(forward=forward, backward=total - forward)


def measure_matmul_peak(size: int, repeats: int) -> list[float]:
    """GFLOP/s of ``repeats`` timed fp32 ``[size, size] @ [size, size]`` matmuls (after one untimed one)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    flops = 2 * size**3
    torch.mm(a, b)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        rates.append(flops / (time.perf_counter() - start) / 1e9)
    return rates


def measure(
    objective: PretrainObjective,
    optimizer: torch.optim.Optimizer,
    batch: PretrainBatch,
    precision: str,
    warmup: int,
    repeats: int,
    clip_grad_norm: float,
) -> tuple[list[float], list[float]]:
    """Per-repeat throughput (samples/s) and the loss of every timed step, after ``warmup`` untimed steps."""
    for _ in range(warmup):
        train_step(objective, optimizer, batch, precision, clip_grad_norm)
    rates, losses = [], []
    for i in range(repeats):
        start = time.perf_counter()
        loss = train_step(objective, optimizer, batch, precision, clip_grad_norm)
        seconds = time.perf_counter() - start
        rates.append(batch.batch_size / seconds)
        losses.append(loss)
        log(f"  {precision} step {i + 1}/{repeats}: {seconds:.1f} s, loss {loss:.3f}")
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"{precision}: a timed step produced a non-finite loss {losses}")
    return rates, losses


def format_table(rows: Sequence[Row]) -> str:
    """Markdown table; the last column is a row's median throughput over the eager fp32 median at the same batch
    (bf16/fp32 for bf16 rows, compiled/eager for compiled rows)."""
    fp32 = {r.batch: r.median for r in rows if r.precision == "fp32" and not r.compiled}
    head = (
        "| precision | compiled | batch | steps (warmup + timed) | samples/s min | samples/s median | samples/s max "
        "| s/step (median) | GFLOP/sample (fwd+bwd) | achieved GFLOP/s (median) | MFU | speed vs eager fp32 |"
    )
    lines = [head, "|---|---|---|---|" + "---:|" * 8]
    for r in rows:
        ratio = f"{r.median / fp32[r.batch]:.2f}" if r.batch in fp32 else "n/a"
        lines.append(
            f"| {r.precision} | {'yes' if r.compiled else 'no'} | {r.batch} | {r.warmup} + {r.repeats} "
            f"| {fmt_number(min(r.samples_per_second))} "
            f"| {fmt_number(r.median)} | {fmt_number(max(r.samples_per_second))} | {fmt_number(r.seconds_per_step)} "
            f"| {fmt_number(r.gflop_per_sample)} | {fmt_number(r.achieved_gflops)} | {100 * r.mfu:.1f}% | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, the peak, the FLOPs and the environment, optionally write JSON."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    cfg = stage1_config(args.variant, args.image_size)
    objective = build_objective(cfg)
    objective.train()
    optimizer = build_optimizer(objective, cfg.optim)
    trainable = sum(p.numel() for p in objective.parameters() if p.requires_grad)
    plans = plan_rows(args)
    batches = {b: make_batch(b, args.image_size, args.text_tokens, args.seed) for b in sorted({p.batch for p in plans})}

    log(f"peak: {args.matmul_repeats} fp32 matmuls of {args.matmul_size}^2")
    peak_rates = measure_matmul_peak(args.matmul_size, args.matmul_repeats)
    peak = statistics.median(peak_rates)
    log(f"peak: median {peak:.1f} GFLOP/s")
    flops: dict[int, FlopCount] = {}
    for size, batch in batches.items():
        log(f"counting the FLOPs of one fp32 step at batch {size}")
        flops[size] = count_step_flops(objective, batch)

    rows: list[Row] = []
    losses: dict[str, list[float]] = {}
    compile_seconds = None
    for plan in plans:
        if plan.compiled and compile_seconds is None:
            from onepeace.train.compile import compile_blocks

            log(f"compiled {compile_blocks(objective)} fusion blocks; the first warm-up step compiles them")
            compile_seconds = time.perf_counter()
            train_step(objective, optimizer, batches[plan.batch], plan.precision, cfg.optim.clip_grad_norm)
            compile_seconds = time.perf_counter() - compile_seconds
            log(f"first compiled step (with compilation): {compile_seconds:.1f} s")
        label = f"{plan.precision}{'_compiled' if plan.compiled else ''}_batch{plan.batch}"
        log(f"{label}: {plan.warmup} warmup + {plan.repeats} timed steps")
        rates, losses[label] = measure(
            objective,
            optimizer,
            batches[plan.batch],
            plan.precision,
            plan.warmup,
            plan.repeats,
            cfg.optim.clip_grad_norm,
        )
        gflop = flops[plan.batch].total / plan.batch / 1e9
        rows.append(Row(plan.precision, plan.batch, plan.warmup, plan.repeats, rates, gflop, peak, plan.compiled))
    wall = time.perf_counter() - wall

    env = environment()
    print(format_table(rows))
    print()
    print(f"Environment: {environment_line(env)}")
    print(
        f"Peak: fp32 {args.matmul_size}x{args.matmul_size} matmul, median of {args.matmul_repeats}: "
        f"{peak:.1f} GFLOP/s (min {min(peak_rates):.1f}, max {max(peak_rates):.1f}); MFU = achieved / peak."
    )
    print(
        f"Variant {args.variant}, stage 1 (text + image, official decoder), {trainable:,} trainable parameters; "
        f"image {args.image_size}x{args.image_size}, text {args.text_tokens} tokens incl. eos; "
        f"wall time of the run {wall / 60:.1f} min."
    )
    split = "; ".join(
        f"batch {b}: forward {f.forward / b / 1e9:.1f} + backward {f.backward / b / 1e9:.1f} GFLOP/sample "
        f"(backward/forward {f.backward / f.forward:.2f})"
        for b, f in flops.items()
    )
    print(f"FLOPs: one fp32 forward + backward counted with FlopCounterMode (2 per MAC); {split}.")
    if compile_seconds is not None:
        print(
            f"Compiled rows: every fusion block compiled (inductor); first step, compilation included: "
            f"{compile_seconds:.1f} s."
        )
    if args.json is not None:
        record = {
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "environment": env,
            "peak_gflops": {"median": peak, "all": peak_rates},
            "flops_per_step": {str(b): asdict(f) | {"total": f.total} for b, f in flops.items()},
            "trainable_parameters": trainable,
            "wall_seconds": wall,
            "first_compiled_step_seconds": compile_seconds,
            "losses": losses,
            "rows": [
                asdict(r)
                | {
                    "median": r.median,
                    "seconds_per_step": r.seconds_per_step,
                    "achieved_gflops": r.achieved_gflops,
                    "mfu": r.mfu,
                }
                for r in rows
            ],
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
