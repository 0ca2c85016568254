"""Encoding throughput of a ONE-PEACE variant on CPU, in fp32 and in bf16 autocast.

For each modality the script builds one random batch of model-ready inputs, runs ``warmup`` untimed
passes and then ``repeats`` timed passes of ``encode_<modality>`` under ``torch.inference_mode``, and
reports the min / median / max of the per-repeat throughput. It also counts the model FLOPs of one fp32
forward with ``torch.utils.flop_counter.FlopCounterMode`` (matmul and convolution FLOPs, counted as
2 * multiply-accumulates) and turns the median throughput into achieved GFLOP/s.

Example::

    python benchmarks/encode.py --threads 2 --json encode.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

import onepeace

MODALITIES = ("image", "audio", "text")
PRECISIONS = ("fp32", "bf16")
EOS_ID = 2
TOKEN_RANGE = (4, 50000)
UNITS = {"image": "images/s", "audio": "audio s/s", "text": "texts/s"}

Inputs = tuple[torch.Tensor, ...]


@dataclass
class Row:
    """One measured (modality, precision) pair; throughputs are in ``unit`` (items per second)."""

    modality: str
    precision: str
    batch: int
    unit: str
    per_second: list[float]
    gflop_per_item: float

    @property
    def median(self) -> float:
        """Median of the per-repeat throughputs."""
        return statistics.median(self.per_second)

    @property
    def achieved_gflops(self) -> float:
        """FLOPs per item times the median throughput, in GFLOP/s."""
        return self.gflop_per_item * self.median


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--variant", default="onepeace-base", help="model variant (random initialisation)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per modality and precision")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes before the timed ones")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--modalities", nargs="+", choices=MODALITIES, default=list(MODALITIES))
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument("--image-batch", type=int, default=8, help="images per pass")
    p.add_argument("--audio-batch", type=int, default=1, help="audio clips per pass")
    p.add_argument("--text-batch", type=int, default=32, help="texts per pass")
    p.add_argument("--audio-seconds", type=float, default=10.0, help="duration of every audio clip")
    p.add_argument("--text-tokens", type=int, default=32, help="token ids per text, including eos")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results here")
    args = p.parse_args(argv)
    for name in ("repeats", "image_batch", "audio_batch", "text_batch", "text_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.audio_seconds <= 0:
        p.error("--warmup must be >= 0 and --audio-seconds > 0")
    return args


def make_inputs(model: onepeace.OnePeace, modality: str, batch: int, args: argparse.Namespace) -> Inputs:
    """A random model-ready batch of ``modality`` with the shapes the preprocessing would give."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(args.seed)
    if modality == "image":
        size = cfg.image.image_size
        return (torch.randn(batch, 3, size, size, generator=gen),)
    if modality == "audio":
        samples = round(args.audio_seconds * cfg.audio.sample_rate)
        wave = torch.randn(batch, samples, generator=gen)
        wave = (wave - wave.mean(1, keepdim=True)) / wave.std(1, keepdim=True)
        mask = torch.zeros(batch, cfg.audio.num_frames(samples) + 1, dtype=torch.bool)
        return wave, mask
    low, high = TOKEN_RANGE
    tokens = torch.randint(low, high + 1, (batch, args.text_tokens), generator=gen)
    tokens[:, -1] = EOS_ID
    return (tokens,)


def items_per_sample(modality: str, args: argparse.Namespace) -> float:
    """Throughput units one batch entry stands for: one image, one text or ``audio_seconds`` of audio."""
    return args.audio_seconds if modality == "audio" else 1.0


def encoder(model: onepeace.OnePeace, modality: str) -> Callable[..., torch.Tensor]:
    """The ``encode_<modality>`` method of ``model``."""
    return getattr(model, f"encode_{modality}")


def precision_context(precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast for ``"bf16"``, nothing for ``"fp32"``."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def measure(
    fn: Callable[..., torch.Tensor], inputs: Inputs, precision: str, warmup: int, repeats: int, units: float
) -> list[float]:
    """Per-repeat throughput (``units`` per batch / wall seconds) after ``warmup`` untimed passes."""
    out: list[float] = []
    with torch.inference_mode(), precision_context(precision):
        for _ in range(warmup):
            fn(*inputs)
        for _ in range(repeats):
            start = time.perf_counter()
            fn(*inputs)
            out.append(units / (time.perf_counter() - start))
    return out


def sdpa_cpu_flops(q: Sequence[int], k: Sequence[int], v: Sequence[int], *args: Any, **kwargs: Any) -> int:
    """FLOPs of the CPU fused attention kernel: ``q @ k^T`` plus ``softmax(.) @ v``, 2 per MAC."""
    b, h, s_q, d = q
    s_k, d_v = k[-2], v[-1]
    return 2 * b * h * s_q * s_k * d + 2 * b * h * s_q * s_k * d_v


def count_flops(fn: Callable[..., torch.Tensor], inputs: Inputs) -> int:
    """Matmul, convolution and attention FLOPs of one fp32 forward of ``fn(*inputs)``.

    ``FlopCounterMode`` of this torch has no formula for the CPU attention kernel
    (``aten._scaled_dot_product_flash_attention_for_cpu``), so one is supplied here.
    """
    mapping: dict[Any, Any] = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = sdpa_cpu_flops
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with torch.inference_mode(), counter:
        fn(*inputs)
    return counter.get_total_flops()


def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (falls back to ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_bf16_flags() -> str:
    """The bf16-related CPU flags of ``/proc/cpuinfo`` (``avx512_bf16``, ``amx_bf16``), or ``none``."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    found = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return ", ".join(found) or "none"


def environment() -> dict[str, str]:
    """Facts needed to read the numbers: torch version, threads, CPU, bf16 CPU flags and the date."""
    return {
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "cpu": cpu_model(),
        "cpu_bf16_flags": cpu_bf16_flags(),
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def environment_line(env: dict[str, str]) -> str:
    """One-line summary of :func:`environment`."""
    return (
        f"torch {env['torch']}, {env['threads']} threads, CPU: {env['cpu']} "
        f"(bf16 CPU flags: {env['cpu_bf16_flags']}), Python {env['python']}, {env['date']}"
    )


def format_table(rows: Sequence[Row]) -> str:
    """Markdown table of the rows; the bf16/fp32 ratio is median bf16 over median fp32 throughput."""
    fp32 = {r.modality: r.median for r in rows if r.precision == "fp32"}
    head = (
        "| modality | precision | batch | items/s min | items/s median | items/s max | unit "
        "| GFLOP/item | achieved GFLOP/s (median) | bf16/fp32 speed |"
    )
    lines = [head, "|" + "---|" * 3 + "---:|" * 3 + "---|" + "---:|" * 3]
    for r in rows:
        if r.precision == "fp32":
            ratio = "1.00"
        elif r.modality in fp32:
            ratio = f"{r.median / fp32[r.modality]:.2f}"
        else:
            ratio = "n/a"
        lines.append(
            f"| {r.modality} | {r.precision} | {r.batch} | {fmt_number(min(r.per_second))} "
            f"| {fmt_number(r.median)} | {fmt_number(max(r.per_second))} | {r.unit} "
            f"| {fmt_number(r.gflop_per_item)} | {fmt_number(r.achieved_gflops)} | {ratio} |"
        )
    return "\n".join(lines)


def fmt_number(value: float) -> str:
    """Three significant figures without exponent notation (whole numbers from 1000 up)."""
    value = float(f"{value:.3g}") if abs(value) < 1000 else value
    if value == 0 or abs(value) >= 1000:
        return f"{value:.0f}"
    decimals = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def run_modality(model: onepeace.OnePeace, modality: str, args: argparse.Namespace) -> list[Row]:
    """Count FLOPs (batch of one, fp32) and time every requested precision for one modality."""
    batch = getattr(args, f"{modality}_batch")
    units = items_per_sample(modality, args)
    fn = encoder(model, modality)
    flops = count_flops(fn, make_inputs(model, modality, 1, args))
    gflop_per_item = flops / units / 1e9
    inputs = make_inputs(model, modality, batch, args)
    rows = []
    for precision in args.precisions:
        log(f"{modality} {precision}: batch {batch}, {args.warmup} warmup + {args.repeats} timed passes")
        per_second = measure(fn, inputs, precision, args.warmup, args.repeats, batch * units)
        rows.append(Row(modality, precision, batch, UNITS[modality], per_second, gflop_per_item))
    return rows


def log(message: str) -> None:
    """Progress message on stderr (stdout carries only the results)."""
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table and the environment line, optionally write JSON."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = onepeace.load(args.variant)
    rows: list[Row] = []
    for modality in args.modalities:
        rows.extend(run_modality(model, modality, args))
    env = environment()
    print(format_table(rows))
    print()
    print(f"Environment: {environment_line(env)}")
    audio = f"; audio items are seconds of {args.audio_seconds:g}-s clips" if "audio" in args.modalities else ""
    print(
        f"Variant {args.variant}; {args.warmup} warmup + {args.repeats} timed passes per row; "
        f"text {args.text_tokens} tokens incl. eos{audio}. FLOPs: one fp32 forward, matmul/conv/attention "
        "FLOPs counted as 2 * MACs."
    )
    if args.json is not None:
        record = {
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "environment": env,
            "rows": [asdict(r) | {"median": r.median, "achieved_gflops": r.achieved_gflops} for r in rows],
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
