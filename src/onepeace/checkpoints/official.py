"""Official ONE-PEACE checkpoints (fairseq layout, spec §9) -> our config and state dict."""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from onepeace.checkpoints.mapped import MappedTensor, as_tensor
from onepeace.checkpoints.official_keys import KeyReport, sort_keys, to_official
from onepeace.checkpoints.pickle_io import open_official_checkpoint
from onepeace.config import OnePeaceConfig
from onepeace.errors import CheckpointError
from onepeace.modality import Modality


def parse_feature_spec(spec: str) -> tuple[tuple[int, int, int], ...]:
    """Read an official ``feature_encoder_spec`` such as ``"[(512, 10, 5)] + [(512, 3, 2)] * 4"`` without eval.

    Only list/tuple literals of integers joined by ``+`` and repeated by ``* int`` are accepted.
    """

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [value(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise CheckpointError(f"unsupported feature_encoder_spec element: {ast.dump(node)[:60]}")

    try:
        layers = value(ast.parse(spec, mode="eval").body)
    except SyntaxError as exc:
        raise CheckpointError(f"cannot parse feature_encoder_spec {spec!r}") from exc
    where = "cfg.model.encoder.audio_adapter.feature_encoder_spec"
    if not isinstance(layers, list):
        raise CheckpointError(f"{where} {spec!r} is not a list of (channels, kernel, stride)")
    for i, item in enumerate(layers):
        if not (isinstance(item, tuple) and len(item) == 3):
            raise CheckpointError(f"{where}[{i}] must be a (channels, kernel, stride) triple, got {item!r}")
    return tuple(layers)


def _modalities(report: KeyReport) -> tuple[Modality, ...]:
    present = {ours.split(".")[1] for ours in report.mapped.values() if ours.startswith("adapters.")}
    mods = tuple(m for m in Modality if m.value in present)
    if not mods:
        raise CheckpointError("the checkpoint holds no ONE-PEACE adapter weights (no encoder_wrapper.*_adapter keys)")
    return mods


#: Our config keys -> the official ``cfg`` entries they come from (for messages).
_OFFICIAL_NAMES = {
    "embed_dim": "model.encoder.embed_dim",
    "layers": "model.encoder.layers",
    "heads": "model.encoder.attention_heads",
    "ffn_dim": "model.encoder.ffn_embed_dim",
    "layer_scale_init": "model.encoder.layer_scale_init_value",
    "text.bucket_size": "model.encoder.text_adapter.bucket_size",
    "image.image_size": "task.patch_image_size",
    "audio.bucket_size": "model.encoder.audio_adapter.bucket_size",
    "audio.conv_pos_depth": "model.encoder.audio_adapter.conv_pos_depth",
    "audio.conv_pos_width": "model.encoder.audio_adapter.conv_pos_width",
    "audio.conv_pos_groups": "model.encoder.audio_adapter.conv_pos_groups",
    "audio.feature_layers": "model.encoder.audio_adapter.feature_encoder_spec",
}


_AUDIO_KEYS = ("bucket_size", "conv_pos_depth", "conv_pos_width", "conv_pos_groups")


def config_from_official(cfg: dict, state_dict: Mapping[str, Any], report: KeyReport) -> OnePeaceConfig:
    """Model config of an official checkpoint from its saved ``cfg`` and the shapes of its tensors (or handles).

    Every value is checked by the one config validator (:func:`onepeace.strict_config.build_section`): a value of
    the wrong type or out of range raises :class:`CheckpointError` naming its ``cfg`` entry.
    """
    enc = (cfg.get("model") or {}).get("encoder") or {}
    if not enc:
        raise CheckpointError("the checkpoint's cfg has no model.encoder section; is it a ONE-PEACE checkpoint?")
    mods = _modalities(report)
    ours = {v: k for k, v in report.mapped.items()}
    tables = [k for k in ours if ".rel_pos.tables." in k and k.startswith(f"adapters.{mods[0].value}.")]
    audio, image = enc.get("audio_adapter") or {}, enc.get("image_adapter") or {}
    pos = state_dict.get(ours.get("adapters.image.pos_embed", ""))
    tokens = state_dict.get(ours.get("adapters.text.token_embed.weight", ""))
    values = {
        "embed_dim": enc.get("embed_dim"),
        "layers": enc.get("layers"),
        "heads": enc.get("attention_heads"),
        "ffn_dim": enc.get("ffn_embed_dim"),
        "layer_scale_init": enc.get("layer_scale_init_value", 1e-6) if enc.get("use_layer_scale", True) else 0.0,
        "per_layer_rel_pos": len(tables) > 1,
        "modalities": [m.value for m in mods],
        "text": {
            "vocab_size": tokens.shape[0] if tokens is not None else 50264,
            "bucket_size": (enc.get("text_adapter") or {}).get("bucket_size", 256),
        },
        "image": {
            "image_size": _image_size(cfg, image),
            "pos_grid": math.isqrt(pos.shape[0] - 1) if pos is not None else image.get("bucket_size", 16),
        },
        "audio": {k: audio[k] for k in _AUDIO_KEYS if k in audio},
    }
    if audio.get("feature_encoder_spec"):
        values["audio"]["feature_layers"] = parse_feature_spec(audio["feature_encoder_spec"])
    return _validated(values)


def _image_size(cfg: dict, image: dict) -> Any:
    """``task.patch_image_size``, else 16 x the image adapter's ``rel_bucket_size`` (a non-integer left as it is)."""
    size = (cfg.get("task") or {}).get("patch_image_size")
    if size:
        return size
    grid = image.get("rel_bucket_size", 16)
    return 16 * grid if isinstance(grid, int) and not isinstance(grid, bool) else grid


def _validated(values: dict) -> OnePeaceConfig:
    from onepeace.strict_config import build_section

    try:
        return build_section(OnePeaceConfig, values, "cfg")
    except ValueError as exc:
        message = str(exc)
        head, _, rest = message.partition(" ")
        key = head.removeprefix("cfg.").split("[")[0]
        if key in _OFFICIAL_NAMES:
            message = f"cfg.{_OFFICIAL_NAMES[key]}{head.removeprefix('cfg.' + key)} {rest}"
        raise CheckpointError(message) from None


def official_cfg(cfg: OnePeaceConfig) -> dict:
    """The parts of an official checkpoint's ``cfg`` entry that :func:`config_from_official` reads, for ``cfg``.

    With the official tensors of a model of ``cfg`` (:func:`official_state`) it reads back as ``cfg`` (for the
    fields the official layout records).
    """
    audio = cfg.audio
    spec = " + ".join(f"[{tuple(layer)}]" for layer in audio.feature_layers)
    encoder = {
        "embed_dim": cfg.embed_dim,
        "layers": cfg.layers,
        "attention_heads": cfg.heads,
        "ffn_embed_dim": cfg.ffn_dim,
        "use_layer_scale": cfg.layer_scale_init > 0,
        "layer_scale_init_value": cfg.layer_scale_init,
        "text_adapter": {"bucket_size": cfg.text.bucket_size},
        "image_adapter": {"bucket_size": cfg.image.pos_grid, "rel_bucket_size": cfg.image.grid},
        "audio_adapter": {
            "bucket_size": audio.bucket_size,
            "conv_pos_depth": audio.conv_pos_depth,
            "conv_pos_width": audio.conv_pos_width,
            "conv_pos_groups": audio.conv_pos_groups,
            "feature_encoder_spec": spec,
        },
    }
    return {"model": {"encoder": encoder}, "task": {"patch_image_size": cfg.image.image_size}}


def official_state(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Our state dict (tensors, or anything else per key) under the official key names; raises
    :class:`CheckpointError` for a key the official layout has no name for."""
    out = {}
    for key, value in state_dict.items():
        official = to_official(key)
        if official is None:
            raise CheckpointError(f"{key} has no official name")
        out[official] = value
    return out


def read_official(path: str | Path) -> tuple[OnePeaceConfig, dict[str, torch.Tensor], KeyReport]:
    """Read an official ``.pt``: its config, its tensors under our key names, and how the keys were sorted.

    Buffers (``rp_bucket``, ``position_idx``, ``version``), pretraining-only keys and a fine-tuned file's
    classification head (read it with :func:`official_head_state`) are left out; an unknown key raises
    :class:`CheckpointError` naming it. The tensors of a zip archive view the memory-mapped file.
    """
    config, tensors, report = open_official(path)
    return config, {k: as_tensor(v) for k, v in tensors.items()}, report


def open_official(path: str | Path) -> tuple[OnePeaceConfig, dict[str, torch.Tensor | MappedTensor], KeyReport]:
    """:func:`read_official` with the tensors of a zip archive as :class:`MappedTensor` handles (nothing read)."""
    state_dict, cfg = open_official_checkpoint(path)
    report = sort_keys(list(state_dict))
    if report.unknown:
        shown = ", ".join(report.unknown[:10]) + (" ..." if len(report.unknown) > 10 else "")
        raise CheckpointError(f"{path}: {len(report.unknown)} key(s) are not part of ONE-PEACE: {shown}")
    try:
        config = config_from_official(cfg, state_dict, report)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return config, {ours: state_dict[key] for key, ours in report.mapped.items()}, report


def official_pretrain_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official pretraining state dict under the names of :class:`onepeace.train.objectives.PretrainObjective`.

    Backbone keys go under ``model.``, decoder keys under ``decoder.``; buffers and dead parameters are dropped.
    Raises :class:`CheckpointError` listing any key that belongs to neither.
    """
    report = sort_keys(list(state_dict))
    if report.unknown or report.head:
        extra = (report.unknown + sorted(report.head))[:10]
        raise CheckpointError(f"key(s) not part of ONE-PEACE pretraining: {', '.join(extra)}")
    out = {f"model.{ours}": state_dict[key] for key, ours in report.mapped.items()}
    out.update({ours: state_dict[key] for key, ours in report.decoder.items()})
    return out


def official_head_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``classify_head.*`` tensors of an official fine-tuned state dict under :class:`onepeace.heads.ClassifyHead`
    names; raises :class:`CheckpointError` when the file has no classification head."""
    head = {k: v for k, v in sort_keys(list(state_dict)).head.items() if v.startswith("head.")}
    if not head:
        raise CheckpointError("the state dict has no classify_head.* keys")
    return {ours.removeprefix("head."): state_dict[key] for key, ours in head.items()}


def official_task_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official fine-tuned state dict under :class:`onepeace.finetune.model.TaskModel` names: the backbone under
    ``model.``, the classification head under ``head.`` and the NLVR2 type embeddings under ``type_embeddings.``.
    Buffers are dropped; pretraining-only or unknown keys raise :class:`CheckpointError`."""
    report = sort_keys(list(state_dict))
    if report.unknown or report.decoder:
        extra = (report.unknown + sorted(report.decoder))[:10]
        raise CheckpointError(f"key(s) not part of a fine-tuned ONE-PEACE model: {', '.join(extra)}")
    out = {f"model.{ours}": state_dict[key] for key, ours in report.mapped.items()}
    out.update({ours: state_dict[key] for key, ours in report.head.items()})
    return out
