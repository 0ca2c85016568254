"""Parameter counts and storage sizes of a model, a variant or a checkpoint, without loading weights.

:func:`parameter_breakdown` sorts parameters into the parts of spec §1.2 from their names alone, so it works on
a module (real or on the ``meta`` device) as well as on the tensor shapes read from a checkpoint file.
:func:`describe` gathers everything ``onepeace info`` prints.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from onepeace.config import OnePeaceConfig

BYTES_PER_BF16 = 2
_SHARED_LEAVES = ("attn_norm", "ffn_norm", "gamma_attn", "gamma_ffn")
# safetensors dtype codes -> (torch-style name, bytes per element)
_SAFETENSORS_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}


def _shapes(source: Any) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of a module's parameters or of a mapping of tensors / shapes."""
    if hasattr(source, "named_parameters"):
        return {name: tuple(p.shape) for name, p in source.named_parameters()}
    if not isinstance(source, Mapping):
        raise TypeError(f"expected a module or a mapping of name -> tensor/shape, got {type(source).__name__}")
    out = {}
    for name, value in source.items():
        shape = value.shape if hasattr(value, "shape") else value
        out[str(name)] = tuple(int(d) for d in shape)
    return out


def _part(name: str) -> tuple[str, str]:
    """``(group, part)`` of a parameter name: group is a modality, ``"shared"``, ``"logit_scale"`` or ``"other"``."""
    parts = name.split(".")
    if parts[0] == "adapters" and len(parts) > 2:
        return parts[1], "adapter"
    if parts[0] == "projections" and len(parts) > 2:
        return parts[1], "projection"
    if parts[:2] == ["encoder", "final_norms"] and len(parts) > 3:
        return parts[2], "final_norm"
    if parts[:2] == ["encoder", "layers"] and len(parts) > 3:
        if parts[3] == "ffn" and len(parts) > 5:
            return parts[4], "ffn"
        if parts[3] == "attn":
            return "shared", "attention"
        if parts[3] in _SHARED_LEAVES:
            return "shared", "norms_layer_scale"
    if name == "logit_scale":
        return "logit_scale", "logit_scale"
    return "other", name


def parameter_breakdown(source: Any, cfg: OnePeaceConfig) -> dict[str, Any]:
    """Parameter counts by part and by branch (spec §1.2).

    Args:
        source: a model (its ``named_parameters`` are counted; the meta device works) or a mapping from our key
            names to tensors or shapes (e.g. read from a checkpoint).
        cfg: the model config (gives the modalities).

    Returns:
        ``total``; ``modalities[m]`` with ``adapter``, ``ffn`` (all layers), ``final_norm``, ``projection``,
        ``own`` (the sum of those four) and ``branch`` (as the spec counts a branch: adapter + shared encoder
        parameters + FFNs + final norm, no projection); ``shared`` with ``attention``, ``norms_layer_scale``
        (two pre-norms and LayerScale of every layer) and ``total``; ``logit_scale``; ``final_norms`` and
        ``projections_logit_scale`` (spec table rows); ``other`` = ``{name: count}`` of unrecognised entries.
        ``total`` equals the sum of every ``own``, ``shared.total``, ``logit_scale`` and ``other``.
    """
    mods = [m.value for m in cfg.modalities]
    per_mod = {m: {"adapter": 0, "ffn": 0, "final_norm": 0, "projection": 0} for m in mods}
    shared = {"attention": 0, "norms_layer_scale": 0}
    logit_scale, other, total = 0, {}, 0
    for name, shape in _shapes(source).items():
        count = math.prod(shape)
        total += count
        group, part = _part(name)
        if group in per_mod:
            per_mod[group][part] += count
        elif group == "shared":
            shared[part] += count
        elif group == "logit_scale":
            logit_scale += count
        else:
            other[name] = count
    shared["total"] = shared["attention"] + shared["norms_layer_scale"]
    for counts in per_mod.values():
        counts["own"] = counts["adapter"] + counts["ffn"] + counts["final_norm"] + counts["projection"]
        counts["branch"] = counts["adapter"] + shared["total"] + counts["ffn"] + counts["final_norm"]
    return {
        "total": total,
        "modalities": per_mod,
        "shared": shared,
        "logit_scale": logit_scale,
        "final_norms": sum(c["final_norm"] for c in per_mod.values()),
        "projections_logit_scale": sum(c["projection"] for c in per_mod.values()) + logit_scale,
        "other": other,
    }


def _storage(entries: Mapping[str, tuple[str, int, int]]) -> dict[str, Any]:
    """Size summary of ``{name: (dtype, numel, bytes)}``."""
    dtypes: dict[str, int] = {}
    for dtype, numel, _ in entries.values():
        dtypes[dtype] = dtypes.get(dtype, 0) + numel
    stored = sum(nbytes for _, _, nbytes in entries.values())
    numel = sum(n for _, n, _ in entries.values())
    return {"dtypes": dtypes, "bytes": stored, "bytes_bf16": numel * BYTES_PER_BF16}


def _torch_entries(named: Sequence[tuple[str, Any]]) -> tuple[dict, dict]:
    shapes, entries = {}, {}
    for name, t in named:
        dtype = str(t.dtype).removeprefix("torch.")
        shapes[name] = tuple(t.shape)
        entries[name] = (dtype, t.numel(), t.numel() * t.element_size())
    return shapes, entries


def _variant(name: str) -> tuple[OnePeaceConfig, dict, dict]:
    import torch

    from onepeace.model import OnePeaceModel
    from onepeace.variants import get_variant

    cfg = get_variant(name)
    with torch.device("meta"):
        model = OnePeaceModel(cfg, init=False)
    return cfg, *_torch_entries(list(model.named_parameters()))


def native_shapes(root: Path) -> tuple[OnePeaceConfig, dict, dict]:
    """Config and tensor shapes of a native directory from the safetensors header (no tensor data read)."""
    from safetensors import SafetensorError, safe_open

    from onepeace.checkpoints.native import CONFIG, FORMAT, WEIGHTS
    from onepeace.errors import CheckpointError

    try:
        info = json.loads((root / CONFIG).read_text())
        if not isinstance(info, dict) or info.get("format") != FORMAT or "config" not in info:
            raise CheckpointError(f"{root / CONFIG} is not a onepeace model config (expected format {FORMAT!r})")
        cfg = OnePeaceConfig.from_dict(info["config"])
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{root / CONFIG}: cannot read the model config ({exc})") from exc
    shapes, entries = {}, {}
    try:
        with safe_open(str(root / WEIGHTS), framework="pt") as f:
            for key in f.keys():
                view = f.get_slice(key)
                shape, code = tuple(view.get_shape()), view.get_dtype()
                dtype, size = _SAFETENSORS_DTYPES.get(code, (code.lower(), 0))
                shapes[key] = shape
                entries[key] = (dtype, math.prod(shape), math.prod(shape) * size)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{root / WEIGHTS}: not a readable safetensors file ({exc})") from exc
    return cfg, shapes, entries


def describe(target: str) -> dict[str, Any]:
    """Everything ``onepeace info`` reports about a variant name, a native directory or an official ``.pt``."""
    from onepeace.checkpoints.native import is_native_dir
    from onepeace.pretrained import shipped_weights
    from onepeace.variants import VARIANTS

    shipped = shipped_weights(target) if target in VARIANTS else None
    if shipped is not None:
        kind, path = "variant (pretrained weights shipped with the package)", shipped
        cfg, shapes, entries = native_shapes(shipped)
    elif target in VARIANTS:
        kind, path = "variant (random initialisation)", None
        cfg, shapes, entries = _variant(target)
    elif is_native_dir(target):
        kind, path = "native checkpoint directory", Path(target)
        cfg, shapes, entries = native_shapes(path)
    else:
        from onepeace.loading import read_weights

        cfg, tensors, _ = read_weights(target)
        kind, path = "official checkpoint", Path(target)
        shapes, entries = _torch_entries(list(tensors.items()))
    files = {}
    if path is not None:
        _check_fits(cfg, shapes, f"{path} (config {path / 'config.json'})" if path.is_dir() else str(path))
        found = sorted(path.iterdir()) if path.is_dir() else [path]
        files = {p.name: p.stat().st_size for p in found if p.is_file()}
    return {
        "name": target,
        "kind": kind,
        "files": files,
        "config": cfg.to_dict(),
        "parameters": parameter_breakdown(shapes, cfg),
        **_storage(entries),
    }


def _check_fits(cfg: OnePeaceConfig, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Raise :class:`~onepeace.errors.CheckpointError` when the stored tensor shapes do not fit the model of ``cfg``
    (compared on the meta device: nothing is allocated or read)."""
    import torch

    from onepeace.checkpoints.state import check_state_dict
    from onepeace.model import OnePeaceModel

    with torch.device("meta"):
        model = OnePeaceModel(cfg, init=False)
        stored = {name: torch.empty(shape) for name, shape in shapes.items()}
    check_state_dict(model, stored, source)


_BRANCH_NAMES = {"text": "language", "image": "vision", "audio": "audio"}


def _n(value: int) -> str:
    return f"{value:,}"


def _gib(nbytes: int) -> str:
    return f"{_n(nbytes)} bytes ({nbytes / 2**30:.2f} GiB)"


def _config_line(cfg: dict[str, Any]) -> str:
    width, heads, image = cfg["embed_dim"], cfg["heads"], cfg["image"]["image_size"]
    tables = "per layer" if cfg["per_layer_rel_pos"] else "shared (one per modality)"
    return (
        f"config: width {width}, {cfg['layers']} layers, {heads} heads (head dim {width // heads}), "
        f"FFN {cfg['ffn_dim']}, image {image}x{image} ({image // 16}x{image // 16} patches), "
        f"modalities {', '.join(cfg['modalities'])}, relative-position tables {tables}"
    )


def format_info(info: dict[str, Any]) -> str:
    """Human-readable report of :func:`describe` output (counts with thousands separators)."""
    cfg, counts = info["config"], info["parameters"]
    mods, layers = list(counts["modalities"]), cfg["layers"]
    lines = [f"{info['name']}: {info['kind']}"]
    lines += [f"  file {name}: {_n(size)} bytes" for name, size in info["files"].items()]
    lines += [_config_line(cfg), f"parameters: {_n(counts['total'])}"]
    lines.append("branches (adapter + FFNs + final norm of the modality + the shared encoder; no projection):")
    for m in mods:
        lines.append(f"  {_BRANCH_NAMES.get(m, m) + ' branch':<30}{_n(counts['modalities'][m]['branch']):>16}")
    shared = counts["shared"]
    lines.append(f"  {f'shared encoder (x{layers})':<30}{_n(shared['total']):>16}")
    lines.append(f"{'part':<32}" + "".join(f"{m:>16}" for m in mods))
    rows = [
        ("adapter", "adapter"),
        (f"FFNs (x{layers})", "ffn"),
        ("final norm", "final_norm"),
        ("projection", "projection"),
        ("modality-specific total", "own"),
    ]
    for label, key in rows:
        lines.append(f"  {label:<30}" + "".join(f"{_n(counts['modalities'][m][key]):>16}" for m in mods))
    singles = [
        (f"shared attention (x{layers})", shared["attention"]),
        (f"pre-norms + LayerScale (x{layers})", shared["norms_layer_scale"]),
        ("logit_scale", counts["logit_scale"]),
        ("final norms (all)", counts["final_norms"]),
        ("projections + logit_scale", counts["projections_logit_scale"]),
    ] + [(f"other: {name}", value) for name, value in counts["other"].items()]
    lines += [f"  {label:<30}{_n(value):>16}" for label, value in singles]
    dtypes = ", ".join(f"{d} ({_n(n)})" for d, n in info["dtypes"].items())
    lines.append(f"dtype: {dtypes}")
    stored = "/".join(info["dtypes"]) or "none"
    lines.append(f"size: {_gib(info['bytes'])} as stored ({stored}); {_gib(info['bytes_bf16'])} in bfloat16")
    return "\n".join(lines)
