"""int8 inference on CPU: the Linear layers of a loaded model become dynamically quantised int8 layers.

``onepeace.load(..., dtype="int8")`` calls :func:`quantize_int8`. It uses PyTorch's own dynamic quantisation
(``torch.ao.quantization.quantize_dynamic``): int8 weights with one symmetric scale per output channel, stored once,
and activations quantised per call with one scale for the whole input tensor (8 bits on CPUs with VNNI, else the
7 bits PyTorch uses by default on x86, see :func:`full_range_activations`); the matrix products run in int8 (fbgemm
/ oneDNN on x86, QNNPACK on ARM) and their outputs come back in float32.

Converted: the attention projections (q, k, v, out) and every modality's GeGLU feed-forward network (gate, linear,
out) of each fusion layer, and the audio adapter's frame projection. Kept in float32: the per-modality projection
heads (:data:`FP32_LINEARS`; a negligible share of the compute, applied to one row per item), token and position
embeddings, every LayerNorm (including the Sub-LN norms inside attention and the FFNs), the relative-position tables,
and the image stem and audio convolutions (dynamic quantisation covers Linear layers only).

Because an activation's scale comes from the whole batch tensor, an item's int8 embedding depends slightly on the
other items of its batch (float32 does not): on the shipped model, cosine >= 0.9998 between an item alone and in a
mixed batch of 8.

The model code (:mod:`onepeace.model`) is not changed; the conversion swaps modules from outside. The result is for
inference only: it lives on the CPU, stays in eval mode, and none of its tensors require gradients.
"""

from __future__ import annotations

import copy
import gc
import re
import warnings
from typing import Any

import torch
from torch import nn

from onepeace.api import OnePeace

INT8_NAMES = ("int8", "qint8")
"""Spellings of ``dtype`` that ask :func:`onepeace.load` for the int8 model (``torch.int8`` is accepted too)."""

FP32_LINEARS = re.compile(r"(^|\.)projections\.")
"""Names of Linear layers that stay float32: the projection heads (``model.projections.<modality>``)."""

# The two warnings PyTorch emits while converting (torch.ao.quantization and the quantized tensor constructors are
# marked deprecated in favour of torchao, whose CPU int8 path is slower than this one without torch.compile).
_CONVERSION_WARNINGS = (
    (DeprecationWarning, r"torch\.ao\.quantization is deprecated"),
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor creation"),
)


def is_int8_dtype(dtype: Any) -> bool:
    """True when ``dtype`` (a string or ``torch.int8``) asks for the int8 model."""
    if isinstance(dtype, torch.dtype):
        return dtype in (torch.int8, torch.qint8)
    return isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in INT8_NAMES


class Int8OnePeace(OnePeace):
    """A :class:`~onepeace.api.OnePeace` whose Linear layers are dynamically quantised int8 (CPU, inference only).

    Embeddings and hidden states come out in float32 with the same shapes as the float model's. ``train()``,
    ``to(<non-CPU device>)``, ``cuda()`` and casts to another dtype raise ``ValueError``.
    """

    def train(self, mode: bool = True) -> Int8OnePeace:
        if mode:
            raise ValueError(
                "an int8 model is for inference only and cannot be trained; load it in float32 for training"
            )
        return super().train(False)

    def to(self, *args: Any, **kwargs: Any) -> Int8OnePeace:
        device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(_cpu_only(device))
        if dtype is not None and dtype != torch.float32:
            raise ValueError(f"an int8 model cannot be cast to {dtype}; load it with that dtype instead")
        return self

    def cuda(self, device: Any = None) -> Int8OnePeace:
        raise ValueError(_cpu_only("cuda"))


def _cpu_only(device: Any) -> str:
    return f"int8 runs on the CPU only, not on {device}; use dtype float32 or bf16 on that device"


def check_int8_device(device: str | torch.device | None) -> None:
    """Raise ``ValueError`` unless ``device`` is None or a CPU device."""
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(_cpu_only(device))


def quantize_int8(model: OnePeace, *, inplace: bool = False) -> Int8OnePeace:
    """An inference-only int8 version of a float ``model`` on the CPU.

    Args:
        model: a loaded float model (float32, bf16 or fp16 parameters; bf16/fp16 are widened to float32 first).
        inplace: convert ``model``'s own network (no copy, for a model nothing else uses); by default ``model`` is
            left unchanged.

    Raises:
        ValueError: the model is not on the CPU, or this PyTorch has no int8 CPU engine.
    """
    check_int8_device(model.device)
    if torch.backends.quantized.engine == "none":
        raise ValueError("this PyTorch build has no int8 CPU engine (torch.backends.quantized); use float32")
    network = model.model
    if not inplace:
        network = copy.deepcopy(network)
    network.float().eval()
    quantize_linears(network)
    if full_range_activations():
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        for module in network.modules():
            if isinstance(module, DynamicLinear):
                module.version = 3  # the layer format whose forward quantises activations to all 8 bits
    network.requires_grad_(False)
    return Int8OnePeace(network).eval()


def full_range_activations() -> bool:
    """True when int8 activations may use all 8 bits: the x86 engine on a CPU with VNNI instructions.

    PyTorch's dynamic Linear quantises activations to 7 bits on x86 (``reduce_range``) because without VNNI the
    int8 products are summed in pairs into int16, which 8-bit activations can overflow; VNNI sums into int32. On
    random onepeace-base weights with full-strength residual branches (layer scale 1) the 8th bit raises the lowest
    cosine to float32 from 0.969 / 0.974 / 0.984 to 0.992 / 0.992 / 0.997 (image / audio / text).
    """
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def quantize_linears(module: nn.Module) -> None:
    """Swap, in place, every float Linear layer of ``module`` (but the projection heads) for its int8 version.

    Layers already converted are left as they are, so a model can be converted part by part (a loader converts
    each fusion layer as soon as its weights are in, then the rest).
    """
    targets = {name for name, m in module.named_modules() if type(m) is nn.Linear and not FP32_LINEARS.search(name)}
    if not targets:
        return
    with warnings.catch_warnings():
        for category, message in _CONVERSION_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        ao = getattr(torch.ao, "quantization", None)
        if ao is None or not hasattr(ao, "quantize_dynamic"):
            raise ValueError(f"torch {torch.__version__} has no torch.ao.quantization.quantize_dynamic (int8 needs it)")
        config = ao.per_channel_dynamic_qconfig
        ao.quantize_dynamic(module, {name: config for name in targets}, dtype=torch.qint8, inplace=True)
    gc.collect()  # the replaced float layers sit in reference cycles: free their weights before the next layer


def int8_linears(model: nn.Module) -> dict[str, type[nn.Module]]:
    """Module name -> type of every Linear layer of ``model``, float or int8 (for reports and tests)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return {name: type(m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, DynamicLinear))}
