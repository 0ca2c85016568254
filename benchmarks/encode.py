"""Encoding throughput of a ONE-PEACE variant on CPU: eager fp32, bf16 autocast, compiled, int8 and onnxruntime.

For each modality the script builds one random batch of model-ready inputs and times ``encode_<modality>`` under
``torch.inference_mode`` along each requested path: ``fp32`` (eager), ``bf16`` (eager under bf16 autocast),
``compiled`` (fp32 with every fusion block compiled by inductor, as training compiles them), ``int8`` (the model of
``onepeace.load(..., dtype="int8")``), ``onnxruntime`` (the encoders exported by ``onepeace.onnx`` and run by
onnxruntime with the same thread count) and ``onnxruntime-int8`` (their dynamically quantised copies). Each path
gets ``warmup`` untimed passes, then the timed passes alternate path by path, so machine noise reaches every path
alike. The script reports the min / median / max of the per-pass throughput, the ratio of each median to the eager
fp32 median of the same run, and the lowest cosine over the batch between each path's embeddings and eager fp32's.
It also counts the model FLOPs of one fp32 forward with ``torch.utils.flop_counter.FlopCounterMode`` (matmul and
convolution FLOPs, counted as 2 * multiply-accumulates) and turns the median throughput into achieved GFLOP/s.

Example::

    python benchmarks/encode.py --threads 2 --precisions fp32 compiled int8 onnxruntime onnxruntime-int8
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import datetime
import functools
import json
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

import onepeace

MODALITIES = ("image", "audio", "text")
PRECISIONS = ("fp32", "bf16", "compiled", "int8", "onnxruntime", "onnxruntime-int8")
EOS_ID = 2
TOKEN_RANGE = (4, 50000)
UNITS = {"image": "images/s", "audio": "audio s/s", "text": "texts/s"}

Inputs = tuple[torch.Tensor, ...]
Engine = Callable[[str, Inputs], torch.Tensor]
"""Encodes one model-ready batch of a modality (its name, then the inputs) into ``[B, D]`` embeddings."""


@dataclass
class Row:
    """One measured (modality, precision) pair; throughputs are in ``unit`` (items per second).

    ``cosine``: lowest cosine over the batch between this path's embeddings and eager fp32's (1 for fp32 itself);
    ``warmup_s``: seconds of the untimed passes (a compiled path compiles there).
    """

    modality: str
    precision: str
    batch: int
    unit: str
    per_second: list[float]
    gflop_per_item: float
    cosine: float = 1.0
    warmup_s: float = 0.0

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
    p.add_argument(
        "--precisions", nargs="+", choices=PRECISIONS, default=["fp32", "bf16"], help="paths to time (fp32 always runs)"
    )
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
    args.precisions = ["fp32"] + [name for name in dict.fromkeys(args.precisions) if name != "fp32"]
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
    """bf16 autocast for ``"bf16"``, nothing otherwise."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def eager_engine(model: onepeace.OnePeace, precision: str = "fp32") -> Engine:
    """Run ``encode_<modality>`` of ``model`` (under bf16 autocast for ``"bf16"``)."""

    def run(modality: str, inputs: Inputs) -> torch.Tensor:
        with precision_context(precision):
            return encoder(model, modality)(*inputs)

    return run


def compiled_engine(model: onepeace.OnePeace, args: argparse.Namespace) -> Engine:
    """A copy of ``model`` whose fusion blocks are compiled (``onepeace.train.compile.compile_blocks``)."""
    from onepeace.train.compile import compile_blocks

    twin = copy.deepcopy(model)
    compile_blocks(twin)
    return eager_engine(twin)


def int8_engine(model: onepeace.OnePeace, args: argparse.Namespace) -> Engine:
    """The int8 model ``onepeace.load(..., dtype="int8")`` gives, converted from ``model``."""
    from onepeace.quantize import quantize_int8

    return eager_engine(quantize_int8(model))


def onnx_export(model: onepeace.OnePeace, args: argparse.Namespace, int8: bool) -> Path | None:
    """``model``'s encoders exported once to a temporary folder (with int8 copies when ``int8``); None if
    ``onepeace.onnx`` or its dependencies are missing."""
    folder = getattr(args, "onnx_folder", None)
    try:
        from onepeace.onnx import export_onnx, quantize_export

        if folder is None:
            folder = Path(tempfile.mkdtemp(prefix="onepeace-encode-onnx-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            start = time.perf_counter()
            export_onnx(model, folder, check=False)
            log(f"onnxruntime: exported the encoders in {time.perf_counter() - start:.0f} s")
            args.onnx_folder = folder
        if int8 and not any(folder.glob("*.int8.onnx")):
            start = time.perf_counter()
            quantize_export(folder)
            log(f"onnxruntime: quantised the graphs to int8 in {time.perf_counter() - start:.0f} s")
    except ImportError as exc:
        log(f"onnxruntime: row skipped ({exc})")
        return None
    return folder


def onnx_engine(model: onepeace.OnePeace, args: argparse.Namespace, int8: bool = False) -> Engine | None:
    """The exported encoders run by onnxruntime (the int8 copies when ``int8``) with torch's thread count."""
    folder = onnx_export(model, args, int8)
    if folder is None:
        return None
    from onepeace.modality import Modality
    from onepeace.onnx import OnnxModel
    from onepeace.onnx.manifest import INPUTS

    session = OnnxModel(folder, threads=torch.get_num_threads(), variant="int8" if int8 else "")

    def run(modality: str, inputs: Inputs) -> torch.Tensor:
        arrays = {name: t.numpy() for name, t in zip(INPUTS[Modality(modality)], inputs, strict=True)}
        return torch.from_numpy(session.encode(modality, **arrays))

    return run


def build_engines(model: onepeace.OnePeace, args: argparse.Namespace) -> dict[str, Engine]:
    """One engine per requested path, in the order given; a path whose dependency is missing is left out."""
    builders = {
        "compiled": compiled_engine,
        "int8": int8_engine,
        "onnxruntime": onnx_engine,
        "onnxruntime-int8": functools.partial(onnx_engine, int8=True),
    }
    engines: dict[str, Engine] = {}
    for name in args.precisions:
        engine = builders[name](model, args) if name in builders else eager_engine(model, name)
        if engine is not None:
            engines[name] = engine
    return engines


def measure(
    engines: dict[str, Engine], modality: str, inputs: Inputs, args: argparse.Namespace, units: float
) -> tuple[dict[str, list[float]], dict[str, float], dict[str, torch.Tensor]]:
    """Per-pass throughputs (``units`` per batch / wall seconds), the seconds of the warmup passes, the last outputs.

    Every engine first runs ``args.warmup`` untimed passes (a compiled engine compiles there); then the
    ``args.repeats`` timed passes alternate engine by engine.
    """
    rates: dict[str, list[float]] = {name: [] for name in engines}
    warmup_s: dict[str, float] = {}
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for name, run in engines.items():
            start = time.perf_counter()
            for _ in range(args.warmup):
                run(modality, inputs)
            warmup_s[name] = time.perf_counter() - start
        for _ in range(args.repeats):
            for name, run in engines.items():
                start = time.perf_counter()
                outputs[name] = run(modality, inputs)
                rates[name].append(units / (time.perf_counter() - start))
    return rates, warmup_s, outputs


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
    """Markdown table of the rows; the speed ratio is a path's median throughput over eager fp32's (same run)."""
    fp32 = {r.modality: r.median for r in rows if r.precision == "fp32"}
    head = (
        "| modality | path | batch | items/s min | items/s median | items/s max | unit "
        "| GFLOP/item | achieved GFLOP/s (median) | speed / eager fp32 | cosine to fp32 (min) |"
    )
    lines = [head, "|" + "---|" * 3 + "---:|" * 3 + "---|" + "---:|" * 4]
    for r in rows:
        ratio = f"{r.median / fp32[r.modality]:.2f}" if r.modality in fp32 else "n/a"
        lines.append(
            f"| {r.modality} | {r.precision} | {r.batch} | {fmt_number(min(r.per_second))} "
            f"| {fmt_number(r.median)} | {fmt_number(max(r.per_second))} | {r.unit} "
            f"| {fmt_number(r.gflop_per_item)} | {fmt_number(r.achieved_gflops)} | {ratio} | {r.cosine:.5f} |"
        )
    return "\n".join(lines)


def fmt_number(value: float) -> str:
    """Three significant figures without exponent notation (whole numbers from 1000 up)."""
    value = float(f"{value:.3g}") if abs(value) < 1000 else value
    if value == 0 or abs(value) >= 1000:
        return f"{value:.0f}"
    decimals = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def run_modality(
    model: onepeace.OnePeace, engines: dict[str, Engine], modality: str, args: argparse.Namespace
) -> list[Row]:
    """Count FLOPs (batch of one, eager fp32) and time every engine on one modality's batch."""
    batch = getattr(args, f"{modality}_batch")
    units = items_per_sample(modality, args)
    flops = count_flops(encoder(model, modality), make_inputs(model, modality, 1, args))
    gflop_per_item = flops / units / 1e9
    inputs = make_inputs(model, modality, batch, args)
    log(f"{modality}: batch {batch}, {args.warmup} warmup + {args.repeats} timed passes of {', '.join(engines)}")
    rates, warmup_s, outputs = measure(engines, modality, inputs, args, batch * units)
    reference = outputs["fp32"].float()
    rows = []
    for name in engines:
        cosine = torch.nn.functional.cosine_similarity(outputs[name].float(), reference, dim=-1).min().item()
        log(f"{modality} {name}: warmup {warmup_s[name]:.1f} s, median {statistics.median(rates[name]):.3g}")
        rows.append(Row(modality, name, batch, UNITS[modality], rates[name], gflop_per_item, cosine, warmup_s[name]))
    return rows


def log(message: str) -> None:
    """Progress message on stderr (stdout carries only the results)."""
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table and the environment line, optionally write JSON."""
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = onepeace.load(args.variant)
    engines = build_engines(model, args)
    rows: list[Row] = []
    for modality in args.modalities:
        rows.extend(run_modality(model, engines, modality, args))
    env = environment()
    print(format_table(rows))
    print()
    print(f"Environment: {environment_line(env)}")
    audio = f"; audio items are seconds of {args.audio_seconds:g}-s clips" if "audio" in args.modalities else ""
    print(
        f"Variant {args.variant}; {args.warmup} warmup + {args.repeats} timed passes per row, alternating paths; "
        f"text {args.text_tokens} tokens incl. eos{audio}. FLOPs: one fp32 forward, matmul/conv/attention "
        f"FLOPs counted as 2 * MACs. Wall time: {(time.perf_counter() - started) / 60:.1f} min."
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
