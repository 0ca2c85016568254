"""Fine-tuning recipes: frozen dataclasses read strictly from YAML (spec §8.2, §5.5).

A recipe's top level holds the run settings of :class:`FinetuneConfig` and the sections ``model``, ``optim``
(:class:`onepeace.train.config.OptimConfig`) and ``data``. Unknown keys at any level are errors. Every recipe opens
with ``# command:``, ``# runtime:`` and ``# expected:`` comment lines; ``paper_target`` names the published result
the recipe aims at.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from onepeace.finetune.tasks import TaskKind, TaskSpec, get_task
from onepeace.strict_config import apply_overrides, build_section, read_mapping
from onepeace.train.config import OptimConfig, check_speed_fields


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class FinetuneModelConfig:
    """The backbone to start from and the fine-tuning changes made to it (spec §3.6, §8.2)."""

    init_from: str | None = None
    """Model directory, official ``.pt`` or variant name (a variant without shipped weights starts at random)."""
    drop_path_rate: float = 0.5
    image_size: int | None = None
    """Fine-tuning image side (a multiple of 16); the image relative-position tables are resampled at load and
    the data section's ``image_size`` is set to it. None: ``data.image_size``."""
    per_layer_rel_pos: bool = True
    """One relative-position table per layer, each a copy of the checkpoint's shared table (official fine-tuning)."""
    num_classes: int | None = None
    """Head outputs; None keeps the task's (e.g. 309 for VGGSound)."""
    label_smoothing: float = 0.0
    head_init_scale: float = 0.001
    """Image classification: the linear head starts at normal(0, 0.02 * scale) (official 0.001)."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.drop_path_rate < 1.0, f"drop_path_rate must lie in [0, 1), got {self.drop_path_rate}")
        _check(
            self.image_size is None or (self.image_size > 0 and self.image_size % 16 == 0),
            f"image_size must be a positive multiple of 16, got {self.image_size}",
        )
        _check(self.num_classes is None or self.num_classes >= 1, "num_classes must be >= 1")
        _check(0.0 <= self.label_smoothing < 1.0, f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        _check(self.head_init_scale > 0, "head_init_scale must be > 0")


@dataclass(frozen=True)
class TaskDataConfig:
    """Where a task's TSV files are and how examples are prepared (spec §6.1-6.3)."""

    train: tuple[str, ...] = ()
    """Training TSV files (concatenated)."""
    valid: tuple[str, ...] = ()
    """Evaluation TSV files, scored after training (and by ``onepeace evaluate``)."""
    root: str | None = None
    """Directory the media paths are relative to (default: the directory of each TSV file)."""
    batch_size: int = 8
    eval_batch_size: int = 16
    num_workers: int = 2
    image_size: int = 256
    max_duration: float = 15.0
    max_text_tokens: int = 70
    prompt: str = "This is a sound of {label}"
    """Zero-shot template; ``{label}`` is replaced by the class name."""
    mixup: float = 0.0
    """Image classification: mixup alpha (0 = off)."""
    cutmix: float = 0.0
    """Image classification: cutmix alpha (0 = off)."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_batch_size", "max_text_tokens"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _check(self.num_workers >= 0, "num_workers must be >= 0")
        _check(
            self.image_size > 0 and self.image_size % 16 == 0,
            f"image_size must be a positive multiple of 16, got {self.image_size}",
        )
        _check(self.max_duration > 0, "max_duration must be > 0")
        _check("{label}" in self.prompt, "prompt must contain {label}")
        _check(self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix must be >= 0")


@dataclass(frozen=True)
class FinetuneOptimConfig(OptimConfig):
    """:class:`OptimConfig` with the defaults of the official fine-tuning base recipe (spec §8.2): AdamW betas
    (0.9, 0.999), no gradient clipping, warmup over the first 10% of the updates."""

    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad_norm: float = 0.0
    warmup_ratio: float | None = 0.1


@dataclass(frozen=True)
class FinetuneConfig:
    """A whole fine-tuning run."""

    task: str = "vggsound"
    paper_target: str = ""
    """The published result this recipe targets, e.g. ``"VGGSound accuracy 59.6 (paper Table 5)"``."""
    seed: int = 1
    precision: Literal["fp32", "bf16"] = "bf16"
    strategy: Literal["none", "ddp", "fsdp"] = "none"
    """Data parallelism under ``torchrun``: DDP or FSDP2 (``none`` or one process: plain)."""
    find_unused_parameters: bool = False
    """DDP: look for parameters without a gradient after every backward. No shipped recipe needs it (the task
    model freezes what its task never reads); for a changed model whose step leaves trainable parameters unused."""
    grad_accum: int = 1
    """Micro-batches per update (the official ``update_freq``): global batch = batch_size x GPUs x grad_accum."""
    fsdp_param_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """FSDP: dtype of the gathered parameters; ``auto``: bf16 under ``precision: bf16``, else fp32."""
    fsdp_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """FSDP: dtype gradients are reduced in."""
    compile: bool = False
    """Compile every fusion block with ``torch.compile`` (one graph per block)."""
    out_dir: str = "runs/finetune"
    log_every: int = 10
    save_every: int = 1000
    """Write a training checkpoint (``out_dir/step_*``, for ``--resume``) every this many updates and after the last."""
    keep_last: int = 2
    """Training checkpoints kept (the newest)."""
    max_updates: int | None = None
    """Stop after this many updates (short runs); the LR schedule keeps its full length."""
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    optim: FinetuneOptimConfig = field(default_factory=lambda: FinetuneOptimConfig(epochs=10))
    data: TaskDataConfig = field(default_factory=TaskDataConfig)

    def __post_init__(self) -> None:
        get_task(self.task)
        if self.model.image_size is not None and self.model.image_size != self.data.image_size:
            object.__setattr__(self, "data", dataclasses.replace(self.data, image_size=self.model.image_size))
        check_speed_fields(self)
        for name in ("log_every", "save_every", "keep_last"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _check(self.grad_accum >= 1, "grad_accum must be >= 1")
        _check(self.max_updates is None or self.max_updates >= 1, "max_updates must be >= 1")
        _check(
            self.optim.total_updates is not None or self.optim.epochs is not None, "optim: give total_updates or epochs"
        )

    @property
    def spec(self) -> TaskSpec:
        return get_task(self.task)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes or self.spec.num_classes

    @property
    def trains(self) -> bool:
        return self.spec.kind is not TaskKind.ZERO_SHOT


def parse_finetune_recipe(
    text: str, overrides: Sequence[str] = (), task: str | None = None, source: str = "recipe"
) -> FinetuneConfig:
    """Build a :class:`FinetuneConfig` from YAML text; ``task`` (from ``--task``) must agree with the recipe's."""
    raw = apply_overrides(read_mapping(text, source), overrides)
    if task is not None:
        if raw.get("task", task) != task:
            raise ValueError(f"{source} is a recipe for task {raw['task']!r}, not {task!r}")
        raw["task"] = task
    if "task" not in raw:
        raise ValueError(f"{source}: give the task (a 'task:' key or --task)")
    return build_section(FinetuneConfig, raw)


def load_finetune_recipe(path: str | Path, overrides: Sequence[str] = (), task: str | None = None) -> FinetuneConfig:
    """Read a fine-tuning recipe file strictly (see :func:`parse_finetune_recipe`)."""
    return parse_finetune_recipe(Path(path).read_text(), overrides, task, source=str(path))


def with_data(cfg: FinetuneConfig, **changes: object) -> FinetuneConfig:
    """A copy of ``cfg`` with fields of its data section changed."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **changes))
