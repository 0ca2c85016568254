"""Fitting a state dict (our key names) to a model: resolution change, checks, memory-friendly loading."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from onepeace.checkpoints.mapped import MappedTensor, materialize
from onepeace.checkpoints.resample import resample_rel_pos_table_2d
from onepeace.config import OnePeaceConfig
from onepeace.errors import CheckpointError
from onepeace.model import OnePeaceModel

#: A checkpoint tensor: loaded, or a handle into a memory-mapped file.
Weight = torch.Tensor | MappedTensor

#: Keys a checkpoint may lack; the model keeps its initial value (the official loader does the same).
OPTIONAL_KEYS = frozenset({"logit_scale"})


def change_image_size(
    cfg: OnePeaceConfig, state_dict: Mapping[str, Weight], image_size: int | None
) -> tuple[OnePeaceConfig, dict[str, Weight]]:
    """Re-target the image branch to ``image_size`` pixels (spec §2.1, resolution change at load).

    The 2-D relative tables are resampled with the geometric-sequence cubic interpolation; absolute positions
    stay stored at their grid and are resized bicubically in every forward pass.
    """
    if image_size is None or image_size == cfg.image.image_size:
        return cfg, state_dict
    new_cfg = cfg.replace(image_size=image_size)
    if "image" not in {m.value for m in cfg.modalities}:
        return new_cfg, state_dict
    out = dict(state_dict)
    prefix = "adapters.image.rel_pos.tables."
    for key, table in state_dict.items():
        if key.startswith(prefix):
            out[key] = resample_rel_pos_table_2d(materialize(table), new_cfg.image.grid)
    return new_cfg, out


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Weight], source: str) -> list[str]:
    """Compare keys and shapes with ``model``; raise :class:`CheckpointError` naming every problem.

    Returns the optional keys that are missing (they keep the model's initial values).
    """
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected[k])
    ]
    problems = []
    if hard_missing := [k for k in missing if k not in OPTIONAL_KEYS]:
        problems.append(f"missing key(s): {_short(hard_missing)}")
    if unexpected:
        problems.append(f"unexpected key(s): {_short(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch: {_short(wrong)}")
    if problems:
        raise CheckpointError(f"{source} does not fit this model: " + "; ".join(problems))
    return [k for k in missing if k in OPTIONAL_KEYS]


def _short(items: list[str], limit: int = 8) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def checked_weights(cfg: OnePeaceConfig, state_dict: Mapping[str, Weight], source: str) -> dict[str, Weight]:
    """``state_dict`` checked against the model of ``cfg`` (built on the meta device), with the initial value of any
    missing optional key added; nothing is read from mapped handles."""
    return _checked(cfg, state_dict, source)[1]


def _checked(cfg: OnePeaceConfig, state_dict: Mapping[str, Weight], source: str) -> tuple[OnePeaceModel, dict]:
    with torch.device("meta"):
        model = OnePeaceModel(cfg, init=False)
    tensors = dict(state_dict)
    for key in check_state_dict(model, state_dict, source):
        if key == "logit_scale":
            tensors[key] = torch.tensor(cfg.logit_scale_init)
    return model, tensors


def build_model(
    cfg: OnePeaceConfig,
    state_dict: Mapping[str, Weight],
    source: str,
    dtype: torch.dtype | None = None,
    convert: Callable[[nn.Module], None] | None = None,
) -> OnePeaceModel:
    """Build a model on the meta device and adopt ``state_dict``'s tensors (floating ones cast to ``dtype``).

    A mapped handle is copied into a new tensor of the target dtype and its file pages are dropped before the next
    one is read, so memory peaks at the built model plus one source tensor; a loaded tensor already in the target
    dtype is adopted without a copy. With ``convert`` (e.g. int8 quantisation, in place), the weights arrive one
    fusion layer at a time and ``convert`` runs on each layer as soon as it holds them, then on the whole model
    once the rest is in: memory peaks at the converted model plus one layer in ``dtype``.
    """
    model, tensors = _checked(cfg, state_dict, source)
    if convert is None:
        loaded = {key: materialize(tensors.pop(key), dtype) for key in list(tensors)}
        model.load_state_dict(loaded, strict=True, assign=True)
        return model.eval()
    for i, layer in enumerate(model.encoder.layers):
        prefix = f"encoder.layers.{i}."
        part = {
            k.removeprefix(prefix): materialize(tensors.pop(k), dtype) for k in list(tensors) if k.startswith(prefix)
        }
        layer.load_state_dict(part, strict=True, assign=True)
        del part
        convert(layer)
    for key in list(tensors):  # the rest, set one by one: load_state_dict would also visit the converted layers
        _assign(model, key, materialize(tensors.pop(key), dtype))
    convert(model)
    return model.eval()


def _assign(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer ``key`` of ``model`` (as ``load_state_dict(assign=True)``)."""
    path, _, name = key.rpartition(".")
    module = model.get_submodule(path)
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=module._parameters[name].requires_grad)
    elif name in module._buffers:
        module._buffers[name] = value
    else:
        raise KeyError(f"{key} is neither a parameter nor a buffer of the model")


def per_layer_tables(state_dict: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """One relative-position table per layer from a state dict with one shared table per adapter (spec §3.6).

    Fine-tuning starts every layer from a copy of the shared table (``adapters.{m}.rel_pos.tables.0.weight``);
    the copies then train separately. Tables already present for layer 1 and up are kept as they are.
    """
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    out = dict(state_dict)
    for key, table in state_dict.items():
        if key.startswith("adapters.") and key.endswith(".rel_pos.tables.0.weight"):
            stem = key.removesuffix("0.weight")
            for j in range(1, layers):
                out.setdefault(f"{stem}{j}.weight", table.clone())
    return out
