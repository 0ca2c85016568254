"""``onepeace export onnx MODEL OUT_DIR``: one ONNX graph per modality encoder plus a manifest (docs/onnx.md).

Needs ``pip install 'onepeace[onnx]'`` (onnx, onnxscript, onnxruntime); imported only when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _opset(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer opset, got {text!r}") from None
    if not 17 <= value <= 23:
        raise argparse.ArgumentTypeError(f"opset must be between 17 and 23, got {value}")
    return value


def _export_onnx(args: argparse.Namespace) -> int:
    """Export, check against eager, optionally quantise; prints one line per file."""
    from onepeace.errors import require

    for module in ("onnx", "onnxscript", "onnxruntime"):
        require(module, "onnx")
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"OUT_DIR {out} exists and is not a directory")
    if args.image_size is not None and (args.image_size <= 0 or args.image_size % 16):
        raise ValueError(f"--image-size must be a positive multiple of 16, got {args.image_size}")
    import logging

    from onepeace.onnx.export import export_onnx

    if not args.debug:  # the exporter logs notes about optional packages (torchvision ops) it does not need here
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    manifest = export_onnx(args.model, out, opset=args.opset, image_size=args.image_size, check=not args.no_check)
    written = [graph["file"] for graph in manifest.graphs.values()]
    if args.int8:
        from onepeace.onnx.quantize import quantize_export

        written += [p.name for p in quantize_export(out)]
    for name in [*written, "onepeace_onnx.json"]:
        path = out / name
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    for modality, diff in manifest.checks.items():
        print(f"checked {modality}: onnxruntime vs eager max abs difference {diff:.2e}")
    return 0


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``export`` with its format ``onnx``."""
    p = subparsers.add_parser(
        "export",
        parents=parents,
        help="export the modality encoders to another runtime (onnx)",
        description="Export a model's encoders for inference outside PyTorch.",
    )
    formats = p.add_subparsers(dest="export_format", metavar="FORMAT", required=True)
    onnx = formats.add_parser(
        "onnx",
        parents=parents,
        help="one ONNX graph per modality encoder, for onnxruntime",
        description="Write text.onnx / image.onnx / audio.onnx (dynamic batch and length; tokens, pixels, or "
        "waveform + padding mask in, normalised embedding out) and onepeace_onnx.json into OUT_DIR. Embed with "
        "onepeace.onnx.OnnxModel(OUT_DIR), which does not need torch.",
    )
    onnx.add_argument("model", metavar="MODEL", help="variant name, model folder or official .pt")
    onnx.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (created if missing)")
    onnx.add_argument("--opset", type=_opset, default=18, help="ONNX opset (17-23, default 18)")
    onnx.add_argument("--image-size", type=int, metavar="PIXELS", help="input resolution (multiple of 16)")
    onnx.add_argument(
        "--int8", action="store_true", help="also write dynamically quantised *.int8.onnx copies (onnxruntime)"
    )
    onnx.add_argument("--no-check", action="store_true", help="skip the onnxruntime-against-eager check")
    onnx.set_defaults(handler=_export_onnx)
