"""Pretraining recipes: frozen dataclasses loaded strictly from YAML (spec §5.1, §5.5, §5.6).

A recipe is a YAML mapping whose top level holds the run settings of :class:`TrainConfig` and the sections ``model``,
``optim``, ``loss`` and ``data``. Unknown keys at any level are errors naming the dotted key and the allowed keys.
Every recipe file opens with a comment header giving the command, the expected runtime and the expected result::

    # command: onepeace train configs/pretrain_vl.yaml
    # runtime: ...
    # expected: ...
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from onepeace.config import OnePeaceConfig
from onepeace.errors import require
from onepeace.modality import Modality
from onepeace.model.decoder import DecoderConfig
from onepeace.strict_config import apply_overrides, build_section, read_mapping
from onepeace.variants import get_variant

REQUIRED_HEADER = ("command", "runtime", "expected")
"""Keys every recipe's leading comment block must give as ``# key: value`` lines."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_speed_fields(cfg: Any) -> None:
    """Check the mixed-precision and compile fields a training config shares (``fsdp_*_dtype``, ``compile``)."""
    _check(
        cfg.fsdp_param_dtype in ("auto", "fp32", "bf16"),
        f"fsdp_param_dtype must be 'auto', 'fp32' or 'bf16', got {cfg.fsdp_param_dtype!r}",
    )
    _check(
        cfg.fsdp_reduce_dtype in ("fp32", "bf16"),
        f"fsdp_reduce_dtype must be 'fp32' or 'bf16', got {cfg.fsdp_reduce_dtype!r}",
    )
    _check(isinstance(cfg.compile, bool), f"compile must be true or false, got {cfg.compile!r}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, gradient clipping and the warmup + cosine schedule (spec §5.5)."""

    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_init_lr: float | None = None
    """LR at update 0 of the warmup; None means ``min_lr``."""
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.05
    clip_grad_norm: float = 3.0
    """Maximum global gradient norm; 0 disables clipping."""
    layer_decay: float = 1.0
    """Layer-wise LR decay factor (1.0 = off, as in pretraining)."""
    warmup_updates: int | None = None
    warmup_ratio: float | None = None
    """Warmup as a fraction of the total updates (``floor(total * ratio)``); exclusive with ``warmup_updates``."""
    total_updates: int | None = None
    epochs: int | None = None
    """Schedule length in epochs; exclusive with ``total_updates`` and resolved once the data size is known."""

    def __post_init__(self) -> None:
        _check(self.lr > 0 and self.min_lr >= 0, "lr must be > 0 and min_lr >= 0")
        _check(all(0.0 <= b < 1.0 for b in self.betas), f"betas must lie in [0, 1), got {self.betas}")
        _check(self.eps > 0 and self.weight_decay >= 0, "eps must be > 0 and weight_decay >= 0")
        _check(self.clip_grad_norm >= 0, "clip_grad_norm must be >= 0 (0 disables clipping)")
        _check(0.0 < self.layer_decay <= 1.0, f"layer_decay must lie in (0, 1], got {self.layer_decay}")
        _check(
            self.warmup_updates is None or self.warmup_ratio is None, "give warmup_updates or warmup_ratio, not both"
        )
        _check(self.total_updates is None or self.epochs is None, "give total_updates or epochs, not both")
        _check(self.warmup_updates is None or self.warmup_updates >= 0, "warmup_updates must be >= 0")
        _check(self.warmup_ratio is None or 0.0 <= self.warmup_ratio < 1.0, "warmup_ratio must lie in [0, 1)")
        _check(self.total_updates is None or self.total_updates > 0, "total_updates must be > 0")
        _check(self.epochs is None or self.epochs > 0, "epochs must be > 0")


@dataclass(frozen=True)
class LossConfig:
    """Weights of the denoising terms (the contrastive term has weight 1) and loss settings (spec §5.1-5.3)."""

    dcl_text: float = 0.5
    dcl_image: float = 1.0
    dcl_vl_text: float = 0.5
    dcl_vl_image: float = 0.5
    dcl_audio: float = 1.0
    dcl_al_text: float = 0.5
    dcl_al_audio: float = 0.5
    dcl_logit_scale: float = 2.5
    label_smoothing: float = 0.1
    """Applies to the denoising losses only."""
    contrastive_gather: Literal["no_grad", "with_grad"] = "no_grad"
    """All-gather of the contrastive embeddings: without gradient (official) or with it."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.label_smoothing < 1.0, f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        _check(self.dcl_logit_scale > 0, "dcl_logit_scale must be > 0")


@dataclass(frozen=True)
class ModelConfig:
    """Backbone architecture, the weights to start from, and the pretraining decoder sizes."""

    variant: str = "onepeace-4b"
    """Named variant (see :mod:`onepeace.variants`) giving the backbone architecture."""
    init_from: str | None = None
    """Checkpoint whose weights start the run (stage 2: the stage-1 result); None trains from scratch."""
    drop_path_rate: float = 0.4
    image_size: int | None = None
    """Training image side; None keeps the variant's."""
    layer_scale_init: float | None = None
    """LayerScale start value; None keeps the variant's (1e-6, the official value). Short runs learn faster
    with a larger value such as 0.1."""
    audio_ffn_init: Literal["random", "text"] = "random"
    """Stage 2 from a checkpoint without an audio branch (stage 1): start the audio FFNs and the audio final
    norm at random (official) or as copies of the trained text ones. The paper also starts the audio extractor
    from WavLM, which is not available offline; from a random extractor, random audio FFNs under the frozen
    attention leave the audio embeddings nearly equal for every clip, and a short run stays on that plateau."""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def __post_init__(self) -> None:
        _check(
            self.audio_ffn_init in ("random", "text"),
            f"audio_ffn_init must be 'random' or 'text', got {self.audio_ffn_init!r}",
        )
        try:
            get_variant(self.variant)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
        _check(0.0 <= self.drop_path_rate < 1.0, f"drop_path_rate must lie in [0, 1), got {self.drop_path_rate}")

    def backbone_config(self, stage: int) -> OnePeaceConfig:
        """Backbone config of a stage: text + image in stage 1, text + audio in stage 2 (spec §5.1)."""
        other = Modality.IMAGE if stage == 1 else Modality.AUDIO
        changes: dict[str, Any] = {"drop_path_rate": self.drop_path_rate, "modalities": (Modality.TEXT, other)}
        if self.image_size is not None:
            changes["image_size"] = self.image_size
        if self.layer_scale_init is not None:
            changes["layer_scale_init"] = self.layer_scale_init
        return get_variant(self.variant).replace(**changes)


@dataclass(frozen=True)
class TrainConfig:
    """A whole pretraining run: run settings at the top level plus the model/optim/loss/data sections."""

    stage: Literal[1, 2] = 1
    seed: int = 3407
    precision: Literal["fp32", "bf16"] = "bf16"
    grad_accum: int = 1
    activation_checkpointing: bool = False
    strategy: Literal["none", "ddp", "fsdp"] = "none"
    find_unused_parameters: bool = False
    fsdp_param_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """FSDP: dtype of the gathered parameters; ``auto``: bf16 under ``precision: bf16``, else fp32."""
    fsdp_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """FSDP: dtype gradients are reduced in."""
    compile: bool = False
    """Compile every fusion block with ``torch.compile`` (one graph per block)."""
    out_dir: str = "runs/pretrain"
    log_every: int = 10
    save_every: int = 1000
    keep_last: int = 3
    tensorboard: bool = False
    max_updates: int | None = None
    """Stop after this many updates (short runs); the LR schedule keeps its full length."""
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: Any = field(default_factory=dict)
    """Data section: a plain mapping, or the dataclass given as ``data_config_type`` to the loader."""

    def __post_init__(self) -> None:
        check_speed_fields(self)
        for name in ("grad_accum", "log_every", "save_every", "keep_last"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _check(self.max_updates is None or self.max_updates >= 1, "max_updates must be >= 1")
        data_ok = isinstance(self.data, Mapping) or dataclasses.is_dataclass(self.data)
        _check(data_ok, f"data must be a mapping, got {type(self.data).__name__}")


# ---------------------------------------------------------------------------------------------- loading
def parse_recipe(
    text: str, overrides: Sequence[str] = (), data_config_type: type | None = None, source: str = "recipe"
) -> TrainConfig:
    """Build a :class:`TrainConfig` from YAML text (see :func:`load_recipe`)."""
    raw = apply_overrides(read_mapping(text, source), overrides)
    cfg = build_section(TrainConfig, raw)
    if data_config_type is not None:
        cfg = dataclasses.replace(cfg, data=build_section(data_config_type, cfg.data, "data"))
    if cfg.optim.total_updates is None and cfg.optim.epochs is None:
        raise ValueError("optim: give total_updates or epochs")
    return cfg


def load_recipe(path: str | Path, overrides: Sequence[str] = (), data_config_type: type | None = None) -> TrainConfig:
    """Load a YAML recipe strictly, applying ``key.sub=value`` overrides.

    The ``data`` section stays a plain dict unless ``data_config_type`` (a dataclass) is given, in which case it is
    built strictly too. Raises ``ValueError`` naming the dotted key for unknown keys, wrong types and bad values.
    """
    return parse_recipe(Path(path).read_text(), overrides, data_config_type, source=str(path))


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def dump_recipe(cfg: TrainConfig) -> str:
    """The resolved config as YAML text that :func:`parse_recipe` reads back to an equal config."""
    yaml = require("yaml", "train")
    return yaml.safe_dump(_plain(cfg), sort_keys=False, default_flow_style=False)


def read_header(text: str) -> dict[str, str]:
    """``# key: value`` lines of the leading comment block (continuation comment lines extend the last value)."""
    header: dict[str, str] = {}
    last = None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            if stripped:
                break
            continue
        body = stripped.lstrip("#").strip()
        match = re.match(r"^([A-Za-z_][\w-]*):\s*(.*)$", body)
        if match:
            last = match.group(1).strip().lower()
            header[last] = match.group(2).strip()
        elif last is not None and body:
            header[last] = f"{header[last]} {body}".strip()
    return header


def check_header(text: str, source: str = "recipe") -> dict[str, str]:
    """The header of a recipe; ``ValueError`` naming the missing or empty keys of :data:`REQUIRED_HEADER`."""
    header = read_header(text)
    missing = [k for k in REQUIRED_HEADER if not header.get(k)]
    if missing:
        raise ValueError(
            f"{source}: the leading comment block lacks {', '.join(missing)} "
            f"(expected '# key: value' lines for {', '.join(REQUIRED_HEADER)})"
        )
    return header
