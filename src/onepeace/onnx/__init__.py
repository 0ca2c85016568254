"""ONNX export of the modality encoders, and a runtime that embeds with onnxruntime without importing torch.

- :func:`export_onnx` (``onepeace export onnx MODEL DIR``) writes ``text.onnx`` / ``image.onnx`` / ``audio.onnx`` and
  ``onepeace_onnx.json``; it needs torch, onnx and onnxscript.
- :class:`OnnxModel` reads such a folder: ``OnnxModel(dir).embed(text=[...], image=[...], audio=[...])`` gives
  numpy ``[B, D]`` arrays; ``encode(modality, **arrays)`` runs one graph on model-ready inputs. It needs
  onnxruntime only (plus soundfile and soxr for audio files), never torch.

Install the extra with ``pip install 'onepeace[onnx]'``. See docs/onnx.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onepeace.onnx.manifest import Manifest, read_manifest
from onepeace.onnx.quantize import quantize_export
from onepeace.onnx.runtime import OnnxEmbeddings, OnnxModel

__all__ = ["Manifest", "OnnxEmbeddings", "OnnxModel", "export_onnx", "quantize_export", "read_manifest"]


def export_onnx(source: Any, out_dir: str | Path, **options: Any) -> Manifest:
    """:func:`onepeace.onnx.export.export_onnx` (imported on call: it needs torch)."""
    from onepeace.onnx.export import export_onnx as export

    return export(source, out_dir, **options)
