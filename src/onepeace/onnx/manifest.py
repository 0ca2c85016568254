"""The ``onepeace_onnx.json`` manifest of an export folder: file names, graph inputs and preprocessing config.

Torch-free: the runtime reads it to rebuild the preprocessing (tokenizer limit, image size, audio config).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onepeace.config import OnePeaceConfig
from onepeace.errors import InputError
from onepeace.modality import Modality

MANIFEST = "onepeace_onnx.json"
FORMAT = "onepeace-onnx"
FORMAT_VERSION = 1
FILES = {Modality.TEXT: "text.onnx", Modality.IMAGE: "image.onnx", Modality.AUDIO: "audio.onnx"}
INPUTS = {Modality.TEXT: ("tokens",), Modality.IMAGE: ("pixels",), Modality.AUDIO: ("waveform", "padding_mask")}
OUTPUT = "normalized_embedding"


@dataclass(frozen=True)
class Manifest:
    """What an export folder holds and what its preprocessing needs.

    Attributes:
        graphs: modality name -> ``{"file", "inputs", "output"}``.
        embed_dim: width D of every output ``[B, D]``.
        image_size: side S of the ``[B, 3, S, S]`` pixels.
        max_text_tokens: BPE tokens kept before eos (a token row is at most ``max_text_tokens + 1`` long).
        audio: the audio adapter config (sample rate, kept seconds, conv stack, batch invariance).
        config: the whole model config (``OnePeaceConfig.to_dict()``).
        checks: modality name -> max abs difference of onnxruntime to eager measured at export (empty if unchecked).
    """

    onepeace_version: str
    opset: int
    source: str | None
    embed_dim: int
    image_size: int
    max_text_tokens: int
    audio: dict[str, Any]
    graphs: dict[str, dict[str, Any]]
    config: dict[str, Any]
    checks: dict[str, float] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @classmethod
    def build(cls, cfg: OnePeaceConfig, opset: int, source: str | None, checks: dict[str, float]) -> Manifest:
        import onepeace

        config = cfg.to_dict()
        graphs = {m.value: {"file": FILES[m], "inputs": list(INPUTS[m]), "output": OUTPUT} for m in cfg.modalities}
        return cls(
            onepeace_version=onepeace.__version__,
            opset=opset,
            source=source,
            embed_dim=cfg.embed_dim,
            image_size=cfg.image.image_size,
            max_text_tokens=cfg.max_text_tokens,
            audio=config["audio"],
            graphs=graphs,
            config=config,
            checks=checks,
        )

    @property
    def model_config(self) -> OnePeaceConfig:
        return OnePeaceConfig.from_dict(self.config)

    @property
    def modalities(self) -> tuple[Modality, ...]:
        return tuple(Modality.parse(name) for name in self.graphs)


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of an export folder; one clear ``InputError`` when the folder is not one."""
    folder = Path(directory)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise InputError(f"{folder}: no such export directory (make one with: onepeace export onnx MODEL {folder})")
    if not path.is_file():
        raise InputError(f"{folder}: not an ONNX export, {MANIFEST} is missing (onepeace export onnx MODEL DIR)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"{path}: not an onepeace ONNX manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path}: manifest format {data.get('format_version')} is not {FORMAT_VERSION}; re-export")
    try:
        return Manifest(**data)
    except TypeError as exc:
        raise InputError(f"{path}: malformed manifest ({exc})") from exc
