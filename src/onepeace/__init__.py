"""onepeace: ONE-PEACE, one representation model for vision, audio and language, in plain PyTorch.

Public API: :func:`load`, :class:`OnePeace`, :class:`Modality`, :func:`list_variants`. Importing the package
does no work; submodules load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Modality", "OnePeace", "OnePeaceConfig", "convert", "list_variants", "load"]

_LAZY = {
    "load": "onepeace.loading",
    "convert": "onepeace.loading",
    "OnePeace": "onepeace.api",
    "Modality": "onepeace.modality",
    "OnePeaceConfig": "onepeace.config",
    "list_variants": "onepeace.variants",
}

if TYPE_CHECKING:
    from onepeace.api import OnePeace
    from onepeace.config import OnePeaceConfig
    from onepeace.loading import convert, load
    from onepeace.modality import Modality
    from onepeace.variants import list_variants


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'onepeace' has no attribute {name!r}")
