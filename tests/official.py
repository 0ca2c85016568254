"""Access to the official ONE-PEACE fixture tensors kept in ``tests/fixtures``."""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load, load_file

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "official_tiny"
TOKEN_TABLE_KEY = "encoder_wrapper.text_adapter.embed_tokens.weight"
PRETRAIN_ONLY_PREFIXES = ("decoder_", "text_mask", "image_mask", "audio_mask")


@lru_cache(maxsize=1)
def _inputs() -> dict[str, torch.Tensor]:
    return load_file(TINY / "inputs.safetensors")


@lru_cache(maxsize=1)
def _outputs() -> dict[str, torch.Tensor]:
    return load_file(TINY / "outputs.safetensors")


def inputs() -> dict[str, torch.Tensor]:
    """The fixture's model inputs and pretraining masks (fresh dict, shared tensors: do not modify)."""
    return dict(_inputs())


def outputs() -> dict[str, torch.Tensor]:
    """The 71 reference output tensors of the official code."""
    return dict(_outputs())


def full_state_dict() -> dict[str, torch.Tensor]:
    """The official tiny pretraining state dict: 232 entries with official key names."""
    sd = load(gzip.open(TINY / "state_dict_compact.safetensors.gz").read())
    ids = sd.pop("compact.embed_tokens.ids")
    rows = sd.pop("compact.embed_tokens.rows")
    shape = sd.pop("compact.embed_tokens.shape").tolist()
    table = torch.zeros(shape, dtype=rows.dtype)
    table[ids] = rows
    sd[TOKEN_TABLE_KEY] = table
    return sd


def inference_state_dict() -> dict[str, torch.Tensor]:
    """The 140 entries an official retrieval checkpoint holds (no pretraining-only keys)."""
    return {
        k: v for k, v in full_state_dict().items() if not k.startswith(("decoder_wrapper",) + PRETRAIN_ONLY_PREFIXES)
    }


def checkpoint_meta() -> dict:
    """Everything of the official fixture checkpoint except its state dict (``cfg``, ``optimizer_history``, ...)."""
    return json.loads((TINY / "checkpoint_meta.json").read_text())


def tiny_config():
    """The fixture's model config with the official batch-dependent audio padding, which the fixture recorded."""
    import dataclasses

    from onepeace.variants import get_variant

    cfg = get_variant("onepeace-tiny")
    return cfg.replace(audio=dataclasses.replace(cfg.audio, batch_invariant=False))


def write_official_checkpoint(path: Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Pack a fairseq-layout ``checkpoint.pt`` (spec §9.1) like the fixture's, at ``path``."""
    payload = checkpoint_meta()
    payload["model"] = inference_state_dict() if state_dict is None else state_dict
    torch.save(payload, path)
    return path
