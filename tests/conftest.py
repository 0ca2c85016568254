"""Shared fixtures: the official tiny checkpoint packed in the fairseq layout, and its converted directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import official  # noqa: E402


@pytest.fixture(scope="session")
def official_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The official tiny inference weights as a fairseq-layout ``checkpoint.pt``."""
    return official.write_official_checkpoint(tmp_path_factory.mktemp("official") / "checkpoint.pt")


@pytest.fixture(scope="session")
def converted_dir(official_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``onepeace convert`` output for the official tiny checkpoint."""
    import onepeace

    return onepeace.convert(official_checkpoint, tmp_path_factory.mktemp("converted") / "tiny")


@pytest.fixture(scope="session", params=["official", "converted"])
def tiny_model(request: pytest.FixtureRequest, official_checkpoint: Path, converted_dir: Path):
    """The official tiny model loaded through ``onepeace.load`` from either format."""
    import onepeace

    path = official_checkpoint if request.param == "official" else converted_dir
    return onepeace.load(path, batch_invariant=False)
