"""Building a task model from a recipe, saving it after fine-tuning and loading it back (spec §3.6, §8, §9.2).

A fine-tuned model is a directory with ``task_model.safetensors`` (every tensor of :class:`TaskModel`) and
``task.json`` (the task, the number of classes and the backbone config).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onepeace.checkpoints.state import change_image_size, per_layer_tables
from onepeace.config import OnePeaceConfig
from onepeace.errors import CheckpointError
from onepeace.finetune.config import FinetuneConfig
from onepeace.finetune.model import TaskModel
from onepeace.finetune.tasks import TaskKind, TaskSpec, get_task
from onepeace.modality import Modality
from onepeace.model import OnePeaceModel
from onepeace.model.init import init_weights
from onepeace.train.distributed import DistInfo
from onepeace.variants import VARIANTS

TASK_FILE, WEIGHTS_FILE = "task.json", "task_model.safetensors"
FORMAT = "onepeace-task-model"
#: Parameters a starting checkpoint may lack: the new head and type embeddings, and the embedding projections
#: and logit scale that official classification checkpoints leave out (classification never reads them).
FRESH_OK = ("head.", "type_embeddings.", "model.projections.", "model.logit_scale")


def is_task_dir(path: str | Path) -> bool:
    return (Path(path) / TASK_FILE).is_file()


def read_start(source: str, lazy: bool = False) -> tuple[OnePeaceConfig, dict[str, torch.Tensor]]:
    """Backbone config and tensors under :class:`TaskModel` names (``model.*``, and ``head.*`` /
    ``type_embeddings.*`` when the source is a fine-tuned model) of a variant, model directory, official ``.pt``
    (pretrained or fine-tuned) or task-model directory. A variant without shipped weights gives no tensors.
    With ``lazy``, safetensors tensors are :class:`~onepeace.train.shard_load.LazyTensor` handles read later,
    rank by rank (relative-position tables, which are resampled or copied per layer, are read at once)."""
    from onepeace.pretrained import shipped_weights
    from onepeace.train.shard_load import open_safetensors

    if source in VARIANTS:
        shipped = shipped_weights(source)
        if shipped is None:
            return VARIANTS[source], {}
        source = str(shipped)
    path = Path(source)
    tables = lambda key: ".rel_pos." in key  # noqa: E731
    if is_task_dir(path):
        from safetensors.torch import load_file

        meta = read_task_meta(path)
        file = path / WEIGHTS_FILE
        weights = open_safetensors(file, eager=tables) if lazy else load_file(str(file))
        return OnePeaceConfig.from_dict(meta["backbone"]), weights
    if path.is_file() and path.suffix != ".safetensors":
        from onepeace.checkpoints.official import config_from_official, official_task_state
        from onepeace.checkpoints.official_keys import sort_keys
        from onepeace.checkpoints.pickle_io import read_official_checkpoint

        state, saved_cfg = read_official_checkpoint(path)
        cfg = config_from_official(saved_cfg, state, sort_keys(list(state)))
        return cfg, {k: v.float() for k, v in official_task_state(state).items()}
    from onepeace.checkpoints.native import WEIGHTS, is_native_dir, read_native_config

    if lazy and is_native_dir(path):
        tensors = open_safetensors(path / WEIGHTS, rename=lambda k: f"model.{k}", eager=tables)
        return read_native_config(path), {k: v.float() for k, v in tensors.items()}
    from onepeace.loading import read_weights

    cfg, tensors, _ = read_weights(path)
    return cfg, {f"model.{k}": v.float() for k, v in tensors.items()}


def _branch_of(key: str) -> str | None:
    """The modality a backbone key belongs to, or None for shared parameters."""
    for part in key.split("."):
        if part in ("text", "image", "audio"):
            return part
    return None


def fit_weights(weights: dict[str, torch.Tensor], cfg: OnePeaceConfig, source_cfg: OnePeaceConfig) -> dict:
    """Starting tensors fitted to the task backbone ``cfg``: other branches dropped, image tables resampled to
    ``cfg``'s resolution, shared relative-position tables copied per layer when ``cfg`` asks for that."""
    keep = {m.value for m in cfg.modalities}
    backbone = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    backbone = {k: v for k, v in backbone.items() if _branch_of(k) in keep or _branch_of(k) is None}
    _, backbone = change_image_size(source_cfg, backbone, cfg.image.image_size)
    if cfg.per_layer_rel_pos:
        backbone = per_layer_tables(backbone, cfg.layers)
    rest = {k: v for k, v in weights.items() if not k.startswith("model.")}
    return {**{f"model.{k}": v for k, v in backbone.items()}, **rest}


def backbone_config(source: OnePeaceConfig, spec: TaskSpec, cfg: FinetuneConfig) -> OnePeaceConfig:
    """The task's backbone: the source architecture with the task's branches, drop path, tables and resolution."""
    missing = [m.value for m in spec.modalities if m not in source.modalities]
    if missing:
        raise CheckpointError(f"task {spec.name} needs the {', '.join(missing)} branch, which the model lacks")
    return source.replace(
        modalities=spec.modalities,
        drop_path_rate=cfg.model.drop_path_rate,
        per_layer_rel_pos=cfg.model.per_layer_rel_pos,
        image_size=cfg.data.image_size if Modality.IMAGE in spec.modalities else source.image.image_size,
    )


def build_task_model(cfg: FinetuneConfig) -> TaskModel:
    """The task model of a recipe: backbone from ``model.init_from``, fresh head, unused parts frozen."""
    source_cfg, weights, bcfg, classes = _start(cfg, lazy=False)
    task = construct_task(cfg, bcfg, classes)
    if weights:
        load_start(task, fit_weights(weights, bcfg, source_cfg), cfg.model.init_from)
    freeze_unused(task)
    return task


def _start(cfg: FinetuneConfig, lazy: bool) -> tuple[OnePeaceConfig, dict, OnePeaceConfig, int]:
    """Source config, starting tensors, task backbone config and head outputs of a recipe."""
    if not cfg.model.init_from:
        raise ValueError("model.init_from is required: a model directory, an official .pt or a variant name")
    source_cfg, weights = read_start(cfg.model.init_from, lazy=lazy)
    bcfg = backbone_config(source_cfg, cfg.spec, cfg)
    classes = cfg.model.num_classes or _head_classes(weights) or cfg.spec.num_classes
    return source_cfg, weights, bcfg, classes


def construct_task(cfg: FinetuneConfig, bcfg: OnePeaceConfig, classes: int) -> TaskModel:
    """The freshly initialised task model, from the seed (also under the meta device, the same operations)."""
    torch.manual_seed(cfg.seed)
    backbone = OnePeaceModel(bcfg, init=False)
    init_weights(backbone, on_meta=True)
    return TaskModel(backbone, cfg.spec, classes, cfg.model.head_init_scale)


def build_task_for_ranks(
    cfg: FinetuneConfig, dist: DistInfo, prepare: Callable[[nn.Module], None] | None = None, **wrap_options: Any
) -> tuple[TaskModel, nn.Module]:
    """The task model on this rank's device and its data-parallel wrapper: ``(task, wrapped)``.

    As :func:`onepeace.train.build.build_for_ranks`: one process builds eagerly; under DDP/FSDP the task model is
    built on the meta device, sharded (FSDP2), materialised rank by rank with the eager values, and the starting
    tensors are read shard by shard. ``prepare`` runs just before wrapping.
    """
    from onepeace.train.distributed import wrap_model
    from onepeace.train.materialize import materialize_for_ranks, record_init

    if dist.world_size == 1 or cfg.strategy == "none":
        task = build_task_model(cfg).to(dist.device)
        if prepare is not None:
            prepare(task)
        return task, wrap_model(task, cfg.strategy, **wrap_options)
    source_cfg, weights, bcfg, classes = _start(cfg, lazy=True)
    record = record_init(lambda: construct_task(cfg, bcfg, classes))
    task = record.module
    freeze_unused(task)
    if prepare is not None:
        prepare(task)

    def load() -> None:
        if weights:
            load_start(task, fit_weights(weights, bcfg, source_cfg), cfg.model.init_from, sharded=True)

    return task, materialize_for_ranks(record, cfg.strategy, dist.device, load, **wrap_options)


def _head_classes(weights: dict[str, torch.Tensor]) -> int | None:
    """Outputs of the head a fine-tuned starting file brings (its last layer decides), or None."""
    for key in ("head.classifier.3.weight", "head.fc.weight"):
        if key in weights:
            return int(weights[key].shape[0])
    return None


def load_start(task: TaskModel, weights: dict[str, torch.Tensor], source: str, sharded: bool = False) -> None:
    """Load starting tensors; only :data:`FRESH_OK` parameters may be missing, nothing may be unexpected.

    ``sharded``: ``task`` may be sharded by FSDP2 and ``weights`` hold lazy handles; each rank reads and copies only
    the rows it holds (:func:`onepeace.train.shard_load.load_local`), after the same checks.
    """
    expected = task.state_dict()
    wrong = [k for k, v in weights.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        shapes = ", ".join(f"{k} {tuple(weights[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:4])
        raise CheckpointError(f"{source} does not fit task {task.spec.name}: shape mismatch {shapes}")
    if sharded:
        missing, unexpected = [k for k in expected if k not in weights], [k for k in weights if k not in expected]
    else:
        result = task.load_state_dict(weights, strict=False)
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    bad = [k for k in missing if not k.startswith(FRESH_OK)]
    if bad or unexpected:
        raise CheckpointError(
            f"{source} does not fit task {task.spec.name}: missing {bad[:6]}, unexpected {unexpected[:6]}"
        )
    if sharded:
        from onepeace.train.shard_load import load_local

        load_local(task, weights)


def segments_read(spec: TaskSpec) -> tuple[Modality, ...]:
    """Modalities whose rows of the last fusion layer's output reach the task's output.

    Retrieval and zero-shot encode each modality in its own pass, and image classification has one modality: all
    of them. A joint pass whose head pools one segment (VQA, NLVR2, grounding, AQA, classification): that segment.
    """
    return spec.modalities if spec.pooled is None else (spec.pooled,)


def final_norms_read(spec: TaskSpec) -> tuple[Modality, ...]:
    """Modalities whose final LayerNorm the task reads (image classification reads the last layer's residual
    stream, without the final norm)."""
    return () if spec.kind is TaskKind.IMAGE_CLASSIFY else segments_read(spec)


def unread_parameters(task: TaskModel) -> list[nn.Parameter]:
    """Parameters the task's output never depends on, derived from its spec (kind, pooled segment, modalities).

    * projections and ``logit_scale`` outside retrieval and zero-shot (only embeddings read them);
    * the final norms of the segments :func:`final_norms_read` leaves out;
    * in the last fusion layer, the feed-forward network and, with one relative-position table per layer, the last
      table of every modality outside :func:`segments_read`: their output only feeds that modality's rows, which
      the head never reads after the last layer (their gradient is identically zero);
    * the adapters' mask embeddings (masked pretraining passes only).
    """
    spec, model = task.spec, task.model
    modules: list[nn.Module] = []
    if spec.has_head:
        modules.append(model.projections)
    normed, read = final_norms_read(spec), segments_read(spec)
    last = model.encoder.layers[-1]
    for modality in model.modalities:
        if modality not in normed:
            modules.append(model.encoder.final_norms[modality.value])
        if modality not in read:
            modules.append(last.ffn[modality.value])
            tables = model.adapter(modality).rel_pos.tables
            if len(tables) == len(model.encoder.layers):
                modules.append(tables[-1])
    params = [p for module in modules for p in module.parameters()]
    if spec.has_head:
        params.append(model.logit_scale)
    params += [
        a.mask_embedding
        for a in model.adapters.values()
        if isinstance(getattr(a, "mask_embedding", None), nn.Parameter)
    ]
    return params


def freeze_unused(task: TaskModel) -> list[str]:
    """Turn off gradients of the parameters the task never reads (:func:`unread_parameters`), so that every
    trainable parameter gets a gradient in every step (as DDP and FSDP require without
    ``find_unused_parameters``); returns their names."""
    unread = {id(p) for p in unread_parameters(task)}
    frozen = []
    for name, param in task.named_parameters():
        if id(param) in unread:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def save_task_model(
    task: TaskModel, out_dir: str | Path, extra: dict | None = None, state: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write ``task.json`` and ``task_model.safetensors`` into ``out_dir`` (created) and return it.

    ``state``: the full state dict to write instead of ``task.state_dict()`` (gathered beforehand under FSDP).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    full = task.state_dict() if state is None else state
    state = {k: v.detach().contiguous().cpu() for k, v in full.items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(out / WEIGHTS_FILE)
    num_classes = task_classes(task)
    meta = {"format": FORMAT, "task": task.spec.name, "num_classes": num_classes, **(extra or {})}
    meta["backbone"] = task.model.cfg.to_dict()
    (out / TASK_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def task_classes(task: TaskModel) -> int:
    """Outputs of the task model's head (0 without a head)."""
    if task.head is None:
        return 0
    last = task.head.fc if hasattr(task.head, "fc") else task.head.classifier[-1]
    return int(last.out_features)


def read_task_meta(path: str | Path) -> dict:
    """``task.json`` of a task-model directory, checked."""
    file = Path(path) / TASK_FILE
    try:
        meta = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: cannot read the task description ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "backbone" not in meta:
        raise CheckpointError(f"{file} is not a onepeace task-model description")
    get_task(str(meta.get("task")))
    return meta


def load_task_model(path: str | Path, device: str | torch.device = "cpu") -> TaskModel:
    """A fine-tuned task model written by :func:`save_task_model`, in eval mode."""
    from safetensors.torch import load_file

    meta = read_task_meta(path)
    spec = get_task(meta["task"])
    bcfg = OnePeaceConfig.from_dict(meta["backbone"])
    task = TaskModel(OnePeaceModel(bcfg, init=False), spec, int(meta["num_classes"]) or 1)
    task.load_state_dict(load_file(str(Path(path) / WEIGHTS_FILE)), strict=True)
    return task.to(device).eval()
