"""Input preprocessing: text (:mod:`.tokenizer`), images (:mod:`.image`) and audio (:mod:`.audio`).

The submodules are imported on demand so that importing :mod:`onepeace.data` stays cheap. The tokenizer, image and
audio modules import torch only inside the functions that return tensors, so their numpy functions also serve the
torch-free ONNX runtime (:mod:`onepeace.onnx`).
"""

from __future__ import annotations

import sys
from typing import Any


def is_tensor(x: Any) -> bool:
    """True when ``x`` is a ``torch.Tensor``, without importing torch (no tensor exists before torch is imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)
