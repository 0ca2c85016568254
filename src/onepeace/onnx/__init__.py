"""ONNX export of the modality encoders, and a runtime that embeds with onnxruntime without importing torch.

- :func:`export_onnx` (``onepeace export onnx MODEL DIR``) writes ``text.onnx`` / ``image.onnx`` / ``audio.onnx`` and
  ``onepeace_onnx.json``; it needs torch, onnx and onnxscript.
- :class:`OnnxModel` reads such a folder: ``OnnxModel(dir).embed(text=[...], image=[...], audio=[...])`` gives
  numpy ``[B, D]`` arrays; ``encode(modality, **arrays)`` runs one graph on model-ready inputs. It needs
  onnxruntime only (plus soundfile and soxr for audio files), never torch.

Install the extra with ``pip install 'onepeace[onnx]'``. See docs/onnx.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Manifest", "OnnxEmbeddings", "OnnxModel", "export_onnx", "quantize_export", "read_manifest"]

_LAZY = {
    "OnnxModel": "onepeace.onnx.runtime",
    "OnnxEmbeddings": "onepeace.onnx.runtime",
    "Manifest": "onepeace.onnx.manifest",
    "read_manifest": "onepeace.onnx.manifest",
    "export_onnx": "onepeace.onnx.export",
    "quantize_export": "onepeace.onnx.quantize",
}

if TYPE_CHECKING:
    from onepeace.onnx.export import export_onnx
    from onepeace.onnx.manifest import Manifest, read_manifest
    from onepeace.onnx.quantize import quantize_export
    from onepeace.onnx.runtime import OnnxEmbeddings, OnnxModel


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'onepeace.onnx' has no attribute {name!r}")
