"""Weights shipped inside the package: a variant name that has them loads them (``onepeace.load("onepeace-small")``)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

#: Variant name -> folder under ``onepeace/assets/models`` holding ``model.safetensors`` + ``config.json``.
SHIPPED = {"onepeace-small": "onepeace-small"}


def shipped_weights(name: str) -> Path | None:
    """The folder of the weights shipped for variant ``name``, or None when the package has none for it."""
    folder = SHIPPED.get(name)
    if folder is None:
        return None
    path = Path(str(resources.files("onepeace") / "assets" / "models" / folder))
    return path if (path / "model.safetensors").is_file() and (path / "config.json").is_file() else None
