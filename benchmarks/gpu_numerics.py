"""Numerics rows of ``gpu_check.py``: the official fixture on a device against the CPU, and the SDPA kernels.

Glossary: B batch, H heads, S sequence, E head dim, D width.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import onepeace

MODALITIES = ("text", "image", "audio")


def official_tiny_checkpoint(fixture: Path, out: Path) -> Path:
    """The fixture's official weights (compact token table expanded) as a fairseq-layout ``.pt`` at ``out``."""
    from safetensors.torch import load

    if not (fixture / "state_dict_compact.safetensors.gz").is_file():
        raise FileNotFoundError(f"{fixture} holds no state_dict_compact.safetensors.gz (run from the repository)")
    state = load(gzip.open(fixture / "state_dict_compact.safetensors.gz").read())
    ids, rows = state.pop("compact.embed_tokens.ids"), state.pop("compact.embed_tokens.rows")
    table = torch.zeros(state.pop("compact.embed_tokens.shape").tolist(), dtype=rows.dtype)
    table[ids] = rows
    state["encoder_wrapper.text_adapter.embed_tokens.weight"] = table
    payload = json.loads((fixture / "checkpoint_meta.json").read_text()) | {"model": state}
    torch.save(payload, out)
    return out


@torch.no_grad()
def fixture_outputs(model: onepeace.OnePeace, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Embedding ``[B, D]`` and hidden states ``[B, S, D]`` per modality of the fixture inputs, on the CPU."""
    device = next(model.parameters()).device
    data = {
        "text": (inputs["text.tokens"].to(device),),
        "image": (inputs["image.pixels"].to(device),),
        "audio": (inputs["audio.waveform"].to(device), inputs["audio.padding_mask"].to(device)),
    }
    out = {}
    for m in MODALITIES:
        out[f"{m}.embedding"] = getattr(model, f"encode_{m}")(*data[m]).cpu()
        arg = data[m][0] if m != "audio" else data[m]
        out[f"{m}.hidden"] = model.forward_features(**{m: arg})[m].hidden.cpu()
    return out


def fixture_row(fixture: Path, device: torch.device) -> dict[str, Any]:
    """Max abs differences per modality: ``device`` against the CPU, and ``device`` against the official outputs."""
    from safetensors.torch import load_file

    inputs, reference = load_file(fixture / "inputs.safetensors"), load_file(fixture / "outputs.safetensors")
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = official_tiny_checkpoint(fixture, Path(tmp) / "checkpoint.pt")
            # the fixture recorded the official batch-dependent audio padding
            cpu = fixture_outputs(onepeace.load(path, batch_invariant=False), inputs)
            dev = fixture_outputs(onepeace.load(path, device=device, batch_invariant=False), inputs)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    diff = {k: float((dev[k] - cpu[k]).abs().max()) for k in dev}
    official = {k: float((dev[k] - reference[k]).abs().max()) for k in dev}
    return {
        "max_abs_diff": {m: {p: diff[f"{m}.{p}"] for p in ("embedding", "hidden")} for m in MODALITIES},
        "max_abs_diff_vs_official": {m: {p: official[f"{m}.{p}"] for p in ("embedding", "hidden")} for m in MODALITIES},
        "dtype": "float32, TF32 off",
    }


# --------------------------------------------------------------------------------------------------- SDPA row
def attention_inputs(device: torch.device, heads: int, head_dim: int, seq: int, batch: int = 4) -> tuple:
    """bf16 q, k, v ``[B, H, S, E]`` and an additive bias ``[B, H, S, S]`` with -inf at the last keys of row 0."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, generator=gen).to(device, torch.bfloat16) for _ in range(3))
    bias = torch.randn(batch, heads, seq, seq, generator=gen)
    bias[0, :, :, seq - seq // 4 :] = float("-inf")  # padded keys of sample 0
    return q, k, v, bias.to(device, torch.bfloat16)


def sdpa_ops(fn: Callable[[], Any]) -> list[str]:
    """The aten SDPA kernels (not the dispatching op) that ``fn`` ran, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if "scaled_dot_product" in n and n != "aten::scaled_dot_product_attention")


@torch.no_grad()
def sdpa_row(device: torch.device, variant: str, text_tokens: int, image_size: int) -> dict[str, Any]:
    """Which SDPA backend takes a bf16 call with an additive bias, and which kernel ``variant``'s forward ran."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = onepeace.load(variant, device=device)
    cfg = model.cfg
    seq = text_tokens + 1 + (image_size // 16) ** 2 + 1  # a joint text + image pass
    q, k, v, bias = attention_inputs(device, cfg.heads, cfg.embed_dim // cfg.heads, seq)
    with sdpa_kernel(SDPBackend.MATH):
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.float())
    backends: dict[str, Any] = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            backends[name.lower()] = {"usable": True, "max_abs_diff_vs_math_fp32": float((out - reference).abs().max())}
        except RuntimeError as exc:
            backends[name.lower()] = {"usable": False, "reason": str(exc).splitlines()[0][:200]}
    tokens = torch.full((2, text_tokens), 5, dtype=torch.long, device=device)
    tokens[1, text_tokens // 2 :] = 1  # a padded text: the bias carries -inf columns
    tokens[0, -1], tokens[1, text_tokens // 2 - 1] = 2, 2  # eos ends each text
    pixels = torch.randn(2, 3, cfg.image.image_size, cfg.image.image_size, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        ran = sdpa_ops(lambda: model.forward_features(text=tokens, image=pixels))
    return {"shape": {"heads": cfg.heads, "head_dim": cfg.embed_dim // cfg.heads, "seq": seq}, "backends": backends,
            "model_kernels": ran}  # fmt: skip
