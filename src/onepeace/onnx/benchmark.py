"""Seconds per batch of eager fp32 against onnxruntime (fp32 graphs, and int8 copies if present), in one run.

``python -m onepeace.onnx.benchmark MODEL ONNX_DIR --images A.png ... --audio A.ogg ... [--threads 2]``

The paths alternate call by call, so machine noise hits every path alike; each gets min/median/max seconds of one
encoder call on the same model-ready batch, its speed-up over eager (median / median), and the cosine of its
embeddings to eager's (lowest over the batch). Preprocessing is not timed. Needs torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

TEXTS = (
    "a frog sitting on a leaf",
    "a black bird singing in a tree",
    "the sound of a bell ringing twice",
    "a red apple on a wooden table",
    "children laughing in a playground",
    "a dog barks at the door",
    "rain falling on a tin roof",
    "a small boat on a calm lake at sunset",
)


def _measure(calls: dict[str, Callable[[], np.ndarray]], repeats: int) -> tuple[dict, dict]:
    """Seconds of each call, the calls alternating, after one warm-up each; and each call's last output."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {label: [] for label in calls}
    outs: dict[str, np.ndarray] = {}
    for _ in range(repeats):
        for label, call in calls.items():
            start = time.perf_counter()
            outs[label] = call()
            times[label].append(time.perf_counter() - start)
    return times, outs


def _rows(times: dict[str, list[float]], outs: dict[str, np.ndarray], reference: str) -> dict[str, dict[str, float]]:
    ref, ref_median = outs[reference], statistics.median(times[reference])
    rows = {}
    for label, t in times.items():
        cosine = (outs[label] * ref).sum(-1) / (np.linalg.norm(outs[label], axis=-1) * np.linalg.norm(ref, axis=-1))
        rows[label] = {
            "min_s": min(t),
            "median_s": statistics.median(t),
            "max_s": max(t),
            "speedup": ref_median / statistics.median(t),
            "min_cosine": float(cosine.min()),
            "max_abs_diff": float(np.abs(outs[label] - ref).max()),
        }
    return rows


def _inputs(model: Any, modality: str, images: list[str], audio: list[str]) -> dict[str, np.ndarray]:
    if modality == "text":
        return {"tokens": model.tokenize(list(TEXTS)).numpy()}
    if modality == "image":
        return {"pixels": model.preprocess_image(images).numpy()}
    waveform, mask = model.preprocess_audio(audio)
    return {"waveform": waveform.numpy(), "padding_mask": mask.numpy()}


def compare(
    source: str, onnx_dir: str, images: list[str], audio: list[str], threads: int = 2, repeats: int = 10
) -> dict[str, dict[str, Any]]:
    """Per modality and path: seconds (min/median/max), speed-up over eager, lowest cosine to eager."""
    import torch

    import onepeace
    from onepeace.onnx import OnnxModel

    torch.set_num_threads(threads)
    model = onepeace.load(source, dtype="float32")
    ort_paths = {"onnxruntime": OnnxModel(onnx_dir, threads=threads)}
    if (Path(onnx_dir) / "text.int8.onnx").is_file():
        ort_paths["onnxruntime int8"] = OnnxModel(onnx_dir, threads=threads, variant="int8")
    report: dict[str, dict[str, Any]] = {}
    for modality in ort_paths["onnxruntime"].modalities:
        arrays = _inputs(model, modality.value, images, audio)
        tensors = [torch.from_numpy(a) for a in arrays.values()]
        encode = getattr(model, f"encode_{modality.value}")
        calls = {"eager fp32": partial(_eager, encode, tensors)}
        calls.update({label: partial(m.encode, modality, **arrays) for label, m in ort_paths.items()})
        with torch.inference_mode():
            times, outs = _measure(calls, repeats)
        batch = {k: list(v.shape) for k, v in arrays.items()}
        report[modality.value] = {"batch": batch, "paths": _rows(times, outs, "eager fp32")}
    return report


def _eager(encode: Callable[..., Any], tensors: list[Any]) -> np.ndarray:
    return encode(*tensors).numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m onepeace.onnx.benchmark", description=__doc__.splitlines()[0])
    p.add_argument("model", help="what onepeace.load accepts (the model ONNX_DIR was exported from)")
    p.add_argument("onnx_dir")
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--audio", nargs="+", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    report = compare(args.model, args.onnx_dir, args.images, args.audio, args.threads, args.repeats)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'modality':8} {'path':18} {'min s':>8} {'median s':>9} {'max s':>8} {'speed-up':>9} {'cosine':>8}")
    for modality, entry in report.items():
        for label, r in entry["paths"].items():
            print(
                f"{modality:8} {label:18} {r['min_s']:8.4f} {r['median_s']:9.4f} {r['max_s']:8.4f} "
                f"{r['speedup']:8.2f}x {r['min_cosine']:8.5f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
