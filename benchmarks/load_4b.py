"""The 4B model on one machine: load time and peak resident memory per dtype, ``convert``, and embedding time.

Writes a full-size checkpoint of random weights in the official fairseq layout (official key names, the fixture's
``args`` / ``cfg`` / ``optimizer_history`` container, ``torch.save`` zip archive) into SCRATCH: for the default
``onepeace-4b`` that is 3,884,740,545 parameters, 15.5 GB in fp32. The archive is written with
``torch.serialization.skip_data`` from fake tensors and then filled tensor by tensor, so writing it never holds the
weights in memory. Then, each in a fresh process:

- ``onepeace.load(path, dtype=...)`` for every ``--dtypes`` entry: seconds, the resident set after importing torch
  and onepeace (``import_kb``) and after building the tiny variant on the meta device (the baseline: a load builds
  its model there, and the first meta build imports torch._dynamo and the model code, about 140 MB whatever the
  model size), its peak after the load (VmHWM), and the weight bytes of the loaded model; then
  seconds to embed one image (640x480), one 10 s clip and one text (``model.embed``, one item each, on
  ``--threads`` threads), ``--repeats`` times;
- ``onepeace.convert(path, out, dtype=...)`` for every ``--convert`` entry (peak resident set, seconds, file size),
  then ``onepeace.load`` of that native directory in the same dtype.

The checkpoint and the converted folders (and SCRATCH, when this run created it) are deleted at the end unless
``--keep``. A dtype that
``onepeace.load`` does not know (``int8`` before it lands) gives a row with its error.

Example (4B, fp32 + bf16 + int8, about 15 minutes on 2 cores, needs ~24 GB of disk and 17 GB of memory)::

    python benchmarks/load_4b.py /var/tmp/load4b --json load_4b.json

A smaller model through the same path (what ``tests/test_load_memory.py`` runs)::

    python benchmarks/load_4b.py /tmp/lb --variant onepeace-base --layers 4 --embed text --convert bf16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
META = ROOT / "tests" / "fixtures" / "official_tiny" / "checkpoint_meta.json"
CHECKPOINT = "one-peace.pt"
TEXT = "a dog barks at a passing car"


def _status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (VmRSS, VmHWM); ``ru_maxrss`` when /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def model_config(variant: str, layers: int | None):
    from onepeace.variants import get_variant

    cfg = get_variant(variant)
    return cfg if layers is None else cfg.replace(layers=layers)


def _container(cfg) -> dict:
    """The fixture's fairseq container (``args``, ``cfg``, ...) with the model and task sizes of ``cfg``."""
    from onepeace.checkpoints.official import official_cfg

    payload = json.loads(META.read_text()) if META.is_file() else {"cfg": {}}
    sizes = official_cfg(cfg)
    model = payload["cfg"].setdefault("model", {})
    encoder = model.setdefault("encoder", {})
    for key, value in sizes["model"]["encoder"].items():
        encoder[key] = {**encoder.get(key, {}), **value} if isinstance(value, dict) else value
    payload["cfg"].setdefault("task", {}).update(sizes["task"])
    return payload


def write_checkpoint(path: Path, cfg, seed: int = 0) -> int:
    """Write random weights of ``cfg`` as an official ``.pt`` at ``path`` one tensor at a time; returns its bytes."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from onepeace.checkpoints.official import official_state
    from onepeace.checkpoints.pickle_io import open_official_checkpoint
    from onepeace.model import OnePeaceModel

    with torch.device("meta"):
        meta_model = OnePeaceModel(cfg, init=False)
    shapes = official_state({k: (tuple(v.shape), v.dtype) for k, v in meta_model.state_dict().items()})
    with FakeTensorMode():
        fake = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in shapes.items()}
    payload = _container(cfg)
    payload["model"] = fake
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(payload, path)
    handles, _ = open_official_checkpoint(path)
    gen = torch.Generator().manual_seed(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        for key in shapes:
            handle = handles[key]
            values = (torch.randn(handle.numel(), generator=gen) * 0.02).to(handle.dtype)
            os.pwrite(fd, values.view(torch.uint8).numpy().data, handle.start + handle.offset * handle.element_size())
    finally:
        os.close(fd)
    return path.stat().st_size


def weight_bytes(state: object) -> int:
    """Bytes of every tensor in a state dict (nested tuples of packed parameters included)."""
    import torch

    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(weight_bytes(v) for v in state.values())
    if isinstance(state, (tuple, list)):
        return sum(weight_bytes(v) for v in state)
    return 0


def _inputs() -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    return {
        "image": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
        "audio": (rng.standard_normal(160_000) * 0.1).astype(np.float32),
        "text": TEXT,
    }


def child(args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process."""
    import torch

    torch.set_num_threads(args.threads)
    import onepeace
    import onepeace.loading  # noqa: F401  (torch, the model and the loaders: part of the baseline)

    out: dict = {"import_kb": _status_kb("VmRSS"), "threads": args.threads}
    # Loading builds the model on the meta device, and the first meta build imports torch._dynamo and the model
    # code (~140 MB, whatever the model size): the baseline is taken after one build of the tiny variant.
    from onepeace.model import OnePeaceModel

    with torch.device("meta"):
        OnePeaceModel(model_config("onepeace-tiny", None), init=False)
    out["baseline_kb"] = _status_kb("VmRSS")
    start = time.perf_counter()
    try:
        if args.child == "convert":
            target = onepeace.convert(args.path, args.out, dtype=args.dtype)
            out["file_bytes"] = (target / "model.safetensors").stat().st_size
        else:
            model = onepeace.load(args.path, dtype=args.dtype)
    except ValueError as exc:
        return {**out, "error": str(exc)}
    out["seconds"] = time.perf_counter() - start
    out["peak_kb"] = _status_kb("VmHWM")
    if args.child != "convert":  # after the peak: an int8 model's state_dict() unpacks a copy of its weights
        out["weight_bytes"] = weight_bytes(model.model.state_dict())
    if args.child == "load":
        print(json.dumps(out), flush=True)  # the load's numbers survive a process killed while embedding
        inputs = _inputs()
        for modality in args.embed:
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                model.embed(**{modality: [inputs[modality]]})
                times.append(time.perf_counter() - start)
                out[f"embed_{modality}_s"] = times
                print(json.dumps(out), flush=True)
    return out


def run_child(
    kind: str, path: Path, dtype: str, args: argparse.Namespace, embed: list[str], out: Path | None, need: int
) -> dict:
    """One measurement in a fresh process, started once ``need`` bytes of memory are available."""
    cmd = [sys.executable, __file__, "--child", kind, "--path", str(path), "--dtype", dtype]
    cmd += ["--threads", str(args.threads), "--repeats", str(args.repeats), "--embed", ",".join(embed) or "none"]
    if out is not None:
        cmd += ["--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    short = _wait_for_memory(need, args.wait)
    if short:
        return {"error": short}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    lines = proc.stdout.strip().splitlines()
    partial = json.loads(lines[-1]) if lines else {}
    if proc.returncode != 0:
        why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        print(proc.stderr[-3000:], file=sys.stderr)
        after = "after loading, " if "seconds" in partial else ""
        failure = f"the process failed {after}({why}; MemAvailable {_available() / 2**30:.1f} GiB after)"
        partial["failed" if after else "error"] = failure
    return partial


def _available() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 when unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _wait_for_memory(need: int, wait: float) -> str | None:
    """None once ``need`` bytes are available (the machine may be shared), else why the run is skipped."""
    deadline = time.monotonic() + wait
    while _available() and _available() < need:
        if time.monotonic() > deadline:
            return f"skipped: needs {need / 2**30:.1f} GiB, {_available() / 2**30:.1f} GiB available after {wait:.0f} s"
        time.sleep(5)
    return None


def _mb(kb: int) -> float:
    return kb / 1024


HEADER = (
    "| run | seconds | weight GB | baseline GiB | peak GiB | (peak - baseline) / weights"
    " | image s min/med/max | 10 s clip s | text s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def _row(name: str, r: dict, weights: int | None = None) -> str:
    if "error" in r:
        return f"| {name} | not available: {r['error']} |"
    if "failed" in r:
        name = f"{name} ({r['failed']})"
    weights = r.get("weight_bytes", weights)
    extra = (r["peak_kb"] - r["baseline_kb"]) * 1024
    ratio = f"{extra / weights:.3f}" if weights else "-"
    gb = f"{weights / 1e9:.2f}" if weights else "-"
    embeds = []
    for m in ("image", "audio", "text"):
        t = r.get(f"embed_{m}_s")
        embeds.append("-" if not t else "/".join(f"{v:.2f}" for v in (min(t), statistics.median(t), max(t))))
    return (
        f"| {name} | {r['seconds']:.1f} | {gb} | {_mb(r['baseline_kb']) / 1024:.2f} | {_mb(r['peak_kb']) / 1024:.2f}"
        f" | {ratio} | " + " | ".join(embeds) + " |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scratch", nargs="?", type=Path, help="folder for the checkpoint (created; deleted after)")
    parser.add_argument("--variant", default="onepeace-4b")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers (smaller runs)")
    parser.add_argument("--dtypes", default="fp32,bf16,int8", help="load dtypes, comma-separated")
    parser.add_argument("--convert", default="bf16", help="convert dtypes, comma-separated ('' for none)")
    parser.add_argument("--embed", default="image,audio,text", help="modalities to embed after each load")
    parser.add_argument("--embed-dtypes", default=None, help="dtypes whose loads also embed (default: all)")
    parser.add_argument("--repeats", type=int, default=1, help="embeddings timed per modality")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--wait", type=float, default=600, help="seconds to wait for enough free memory per run")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and converted folders")
    parser.add_argument("--reuse", action="store_true", help="use SCRATCH's checkpoint when present (from --keep)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--child", choices=("load", "convert"), help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.embed = [m for m in args.embed.split(",") if m and m != "none"]
        print(json.dumps(child(args)))
        return
    if args.scratch is None:
        parser.error("give a scratch folder")
    _measure(args)


#: Bytes per parameter a load in each dtype needs at its peak (int8 conservatively counted as an fp32 load).
_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "int8": 4}


def _measure(args: argparse.Namespace) -> None:
    cfg = model_config(args.variant, args.layers)
    created = not args.scratch.exists()
    args.scratch.mkdir(parents=True, exist_ok=True)
    path = args.scratch / CHECKPOINT
    embed = [m for m in args.embed.split(",") if m]
    embed_dtypes = args.dtypes if args.embed_dtypes is None else args.embed_dtypes
    params = _parameters(cfg)
    results: dict = {"variant": args.variant, "layers": cfg.layers, "params": params, "threads": args.threads}
    runs: dict = results.setdefault("runs", {})
    try:
        start = time.perf_counter()
        if args.reuse and path.is_file():
            results["checkpoint_bytes"] = path.stat().st_size
        else:
            results["checkpoint_bytes"] = write_checkpoint(path, cfg)
            results["write_seconds"] = time.perf_counter() - start
        print(f"checkpoint {path}: {results['checkpoint_bytes'] / 1e9:.2f} GB", flush=True)
        print(HEADER, flush=True)
        for dtype in [d for d in args.dtypes.split(",") if d]:
            mods = embed if dtype in embed_dtypes.split(",") else []
            need = params * _BYTES.get(dtype, 4) + (1 << 30)
            runs[f"load {dtype}"] = r = run_child("load", path, dtype, args, mods, None, need)
            print(_row(f"load {dtype}", r), flush=True)
        for dtype in [d for d in args.convert.split(",") if d]:
            out = args.scratch / f"native-{dtype}"
            runs[f"convert {dtype}"] = r = run_child("convert", path, dtype, args, [], out, 1 << 30)
            print(_row(f"convert {dtype}", r, params * _BYTES.get(dtype, 4)), flush=True)
            need = params * _BYTES.get(dtype, 4) + (1 << 30)
            runs[f"load native {dtype}"] = r = run_child("load", out, dtype, args, [], None, need)
            print(_row(f"load native {dtype}", r), flush=True)
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
            for out in args.scratch.glob("native-*"):
                shutil.rmtree(out, ignore_errors=True)
            if created and not any(args.scratch.iterdir()):
                args.scratch.rmdir()
        if args.json is not None:
            args.json.write_text(json.dumps(results, indent=2) + "\n")


def _parameters(cfg) -> int:
    import torch

    from onepeace.model import OnePeaceModel

    with torch.device("meta"):
        return sum(t.numel() for t in OnePeaceModel(cfg, init=False).state_dict().values())


if __name__ == "__main__":
    main()
