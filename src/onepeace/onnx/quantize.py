"""Dynamic int8 copies of an export folder's graphs (onnxruntime's ``quantize_dynamic``); torch-free.

The weights of every MatMul and Gemm are stored as int8 with one scale per tensor; activations are quantised
per batch at run time. Convolutions, LayerNorms and the attention softmax stay in float32. The copies sit
next to the float graphs as ``text.int8.onnx`` etc.; ``OnnxModel(dir, variant="int8")`` runs them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from onepeace.errors import require
from onepeace.onnx.manifest import read_manifest

QUANTIZED_OPS = ("MatMul", "Gemm")


def quantize_export(directory: str | os.PathLike, *, per_channel: bool = False) -> list[Path]:
    """Write ``<modality>.int8.onnx`` for every graph of the export folder; returns the paths written."""
    require("onnxruntime", "onnx")
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    folder = Path(directory)
    manifest = read_manifest(folder)
    written = []
    for graph in manifest.graphs.values():
        source = folder / graph["file"]
        target = source.with_suffix(".int8.onnx")
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            prepared = Path(scratch) / "prepared.onnx"
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            quantize_dynamic(
                str(prepared),
                str(target),
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                op_types_to_quantize=list(QUANTIZED_OPS),
            )
        written.append(target)
    return written
