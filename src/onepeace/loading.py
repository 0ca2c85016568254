"""``onepeace.load``: a variant name, an official ``.pt`` or a native directory -> :class:`OnePeace`."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch

from onepeace.api import OnePeace
from onepeace.config import OnePeaceConfig
from onepeace.errors import CheckpointError, OnePeaceWarning
from onepeace.model import OnePeaceModel
from onepeace.variants import VARIANTS, list_variants


def read_weights(path: str | Path) -> tuple[OnePeaceConfig, dict[str, torch.Tensor], str]:
    """Config and tensors (our key names) of a checkpoint, and a short description of its kind.

    ``path`` may also be the name of a released embedding checkpoint (``onepeace download --list``), which is
    fetched into the cache on first use unless a file or folder of that name exists. Tensors of a safetensors
    file or a zip ``.pt`` view the memory-mapped file.
    """
    from onepeace.checkpoints.mapped import as_tensor

    cfg, tensors, kind = open_weights(path)
    return cfg, {k: as_tensor(v) for k, v in tensors.items()}, kind


def open_weights(path: str | Path) -> tuple[OnePeaceConfig, dict, str]:
    """:func:`read_weights` with tensors as :class:`~onepeace.checkpoints.mapped.MappedTensor` handles where the
    file can be mapped (nothing read yet), so a loader can convert them one at a time."""
    from onepeace.checkpoints.native import is_native_dir, open_native
    from onepeace.hub.releases import is_release

    p = Path(path)
    if is_release(str(path)) and not p.exists():  # a name given as a Path too (a recipe's model.init_from)
        from onepeace.hub import embedding_checkpoint

        p = embedding_checkpoint(str(path))
    if is_native_dir(p):
        cfg, tensors = open_native(p)
        return cfg, tensors, "native"
    if p.is_dir():
        raise CheckpointError(f"{p} is a directory without config.json; expected a onepeace model directory")
    if not p.exists():
        raise FileNotFoundError(
            f"no such model file or directory: {p} (known variants: {', '.join(list_variants())}; "
            "released checkpoints: onepeace download --list)"
        )
    from onepeace.checkpoints.official import open_official

    cfg, tensors, _ = open_official(p)
    return cfg, tensors, "official"


def load(
    path_or_variant: str | Path,
    *,
    image_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    pretrained: bool = True,
    batch_invariant: bool | None = None,
) -> OnePeace:
    """Load ONE-PEACE in eval mode.

    Args:
        path_or_variant: a variant name (see ``onepeace.list_variants()``), an official fairseq ``.pt``
            checkpoint, a directory with ``model.safetensors`` + ``config.json``, or the name of a released
            embedding checkpoint: ``"ONE-PEACE"`` (the pretrained 4B model), ``"ONE-PEACE_COCO"``,
            ``"ONE-PEACE_Flickr30K"`` or ``"ONE-PEACE_AL_Retrieval"`` (``onepeace download --list``). A released
            name is downloaded on first use into ``ONEPEACE_CACHE`` (default ``~/.cache/onepeace``; a partial
            download resumes, and only a complete file is used), from ``ONEPEACE_WEIGHTS_URL`` when set (a mirror
            with the official relative paths); with ``ONEPEACE_OFFLINE=1`` only the cache is read.
            ``onepeace-small`` loads the weights shipped with the package; the other variants are randomly
            initialised.
        image_size: input resolution in pixels (multiple of 16); the image position tables are adapted.
        device: where to put the model (default CPU).
        dtype: parameter dtype, e.g. ``torch.bfloat16`` or ``"bf16"`` (default: as stored; float32 for variants
            and shipped weights). ``"int8"`` gives a CPU inference model whose Linear layers are dynamically
            quantised to int8 (:mod:`onepeace.quantize`); it refuses a non-CPU ``device``.
        pretrained: False gives a randomly initialised model even for a variant that ships weights.
        batch_invariant: False reproduces the official audio path, where a clip's embedding depends on the longer
            clips of its batch (zero padding reaches its last frames through the positional convolutions); True makes
            every clip's embedding equal the clip run alone. Default: as stored (True unless the config says otherwise).
    """
    from onepeace.checkpoints.state import build_model, change_image_size
    from onepeace.pretrained import SHIPPED, shipped_weights
    from onepeace.quantize import check_int8_device, is_int8_dtype, quantize_int8, quantize_linears

    int8 = is_int8_dtype(dtype)
    if int8:
        check_int8_device(device)
    dtype = torch.float32 if int8 else _parse_dtype(dtype)
    wants_shipped = pretrained and isinstance(path_or_variant, str) and path_or_variant in SHIPPED
    shipped = shipped_weights(path_or_variant) if wants_shipped else None
    if wants_shipped and shipped is None:
        warnings.warn(
            f"this installation has no pretrained weights for {path_or_variant}; it is randomly initialised",
            OnePeaceWarning,
            stacklevel=2,
        )
    if shipped is not None:
        path_or_variant, dtype = shipped, dtype or torch.float32
    if isinstance(path_or_variant, str) and path_or_variant in VARIANTS:
        cfg = _with_batch_invariance(VARIANTS[path_or_variant], batch_invariant)
        if image_size is not None:
            cfg = cfg.replace(image_size=image_size)
        model = OnePeaceModel(cfg).eval()
        if dtype is not None:
            model = model.to(dtype)
    else:
        cfg, tensors, kind = open_weights(path_or_variant)
        cfg, tensors = change_image_size(_with_batch_invariance(cfg, batch_invariant), tensors, image_size)
        convert = quantize_linears if int8 else None  # int8: each layer is converted as soon as it is read
        model = build_model(cfg, tensors, f"{kind} checkpoint {path_or_variant}", dtype, convert=convert)
    if device is not None:
        model = model.to(device)
    return quantize_int8(OnePeace(model), inplace=True) if int8 else OnePeace(model).eval()


def _with_batch_invariance(cfg: OnePeaceConfig, batch_invariant: bool | None) -> OnePeaceConfig:
    if batch_invariant is None:
        return cfg
    if not isinstance(batch_invariant, bool):
        raise TypeError(f"batch_invariant must be True, False or None, got {batch_invariant!r}")
    return cfg.replace(audio=dataclasses.replace(cfg.audio, batch_invariant=batch_invariant))


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        from onepeace.quantize import is_int8_dtype

        if is_int8_dtype(dtype):
            raise ValueError(
                "int8 is applied when a model is loaded (onepeace.load(..., dtype='int8')), not stored; "
                "store float32 or bf16"
            ) from None
        names = ", ".join(sorted(_DTYPES))
        raise ValueError(f"unknown dtype {dtype!r}; use one of: {names} (onepeace.load also takes int8)") from None


def convert(source: str | Path, out_dir: str | Path, dtype: torch.dtype | str | None = None) -> Path:
    """Write ``source`` (an official ``.pt`` or a native directory) as a native directory, optionally cast to ``dtype``
    (e.g. ``"bf16"`` halves the file; :func:`load` reads it back in any dtype).

    Tensors are read from the memory-mapped source, cast and written one at a time: memory holds one tensor, not
    the model."""
    from onepeace.checkpoints.native import save_native
    from onepeace.checkpoints.official import open_official
    from onepeace.checkpoints.state import checked_weights

    target = _parse_dtype(dtype)
    if Path(source).is_dir():
        cfg, tensors, _ = open_weights(source)
        meta: dict = {"converted_from": Path(source).name}
        label = f"checkpoint {source}"
    else:
        cfg, tensors, report = open_official(source)
        meta = {"converted_from": Path(source).name, "ignored_pretraining_keys": len(report.pretrain_only)}
        label = f"official checkpoint {source}"
    return save_native(checked_weights(cfg, tensors, label), cfg, out_dir, metadata=meta, dtype=target)
