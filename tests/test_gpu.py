"""CUDA-only checks, skipped without a GPU: a bf16 autocast training step, the memory-efficient SDPA kernel on the
model's additive attention bias, and an FSDP2 bf16 step on one GPU.

All three start from the official tiny fixture (weights, batch and the official fp32 losses), so each compares with
a ground truth: the official loss for the training steps, the math kernel for SDPA.
"""

from __future__ import annotations

import math
from pathlib import Path

import official
import pytest
import torch
import torch.nn.functional as F

from onepeace.checkpoints.official import official_pretrain_state
from onepeace.data.batch import MaskedView, PretrainBatch
from onepeace.modality import Modality
from onepeace.model import OnePeaceModel
from onepeace.model.decoder import DecoderConfig, PretrainDecoder
from onepeace.train.config import OptimConfig
from onepeace.train.core import autocast
from onepeace.train.objectives import PretrainObjective
from onepeace.train.optim import build_optimizer, clamp_logit_scale_
from onepeace.variants import get_variant

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

IN, OUT = official.inputs(), official.outputs()
TINY_DECODER = DecoderConfig(embed_dim=32, layers=2, heads=2, ffn_dim=96)
"""The decoder of the official tiny fixture (as in test_pretrain_parity.py)."""
BF16_LOSS_RTOL = 2e-2
"""bf16 autocast against the official fp32 total loss. On CPU, bf16 autocast gives 4e-5 (stage 1) and 1e-3 (stage 2)
relative difference on this batch; 2e-2 leaves room for other kernels while catching a wrong dtype path (an fp16
overflow or a mask lost in the cast moves the loss by far more)."""
BF16_ATTN_TOL = dict(atol=2e-2, rtol=2e-2)
"""Efficient kernel (bf16 inputs, fp32 accumulation) against the math kernel on the same inputs upcast to fp32:
attention outputs are convex combinations of ``v`` (|v| of order 1), bf16 rounding of the output is 4e-3 relative."""
STAGE1_PARAMETER = "model.encoder.layers.0.attn.q_proj.weight"
"""A parameter every stage-1 step must train."""


def _objective(device: torch.device) -> PretrainObjective:
    """Stage 1 with the fixture's official weights (every key present), in train mode, on ``device``."""
    cfg = get_variant("onepeace-tiny")
    obj = PretrainObjective(OnePeaceModel(cfg), PretrainDecoder(cfg, TINY_DECODER, tuple(Modality)), 1)
    result = obj.load_state_dict(official_pretrain_state(official.full_state_dict()), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return obj.to(device).train()


def _batch(device: torch.device) -> PretrainBatch:
    names = ["text", "image", "vl_text", "vl_image"]
    views = {n: MaskedView(IN[f"mask_vl.{n}_mask_indices"], IN[f"mask_vl.{n}_preserve_ids"]) for n in names}
    return PretrainBatch(text=IN["text.tokens"], image=IN["image.pixels"], views=views).to(device)


def _trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local values of a plain tensor or an FSDP2 DTensor shard, as a plain fp32 copy."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.detach().float().clone()


def _bf16_step(
    module: torch.nn.Module, batch: PretrainBatch, device_type: str
) -> tuple[float, dict[str, torch.Tensor]]:
    """One AdamW update under bf16 autocast; checks gradients are finite; returns the loss and the old parameters.

    The fixture model has an audio branch, which a stage-1 step does not reach: those parameters get no gradient.
    """
    optimizer = build_optimizer(module, OptimConfig(lr=1e-3, total_updates=10, warmup_updates=0))
    before = {n: _local(p) for n, p in _trainable(module).items()}
    with autocast("bf16", torch.device(device_type)):  # the training core's autocast
        losses = module(batch)
    losses.total.backward()
    grads = {n: p.grad for n, p in _trainable(module).items() if p.grad is not None}
    assert STAGE1_PARAMETER in grads and len(grads) > len(before) // 2, f"{len(grads)} of {len(before)} have a grad"
    assert not any(".audio" in n for n in grads), "stage 1 reached the audio branch"
    bad = sorted(n for n, g in grads.items() if not torch.isfinite(_local(g)).all())
    assert bad == [], f"non-finite gradients: {bad[:5]}"
    torch.nn.utils.clip_grad_norm_(list(_trainable(module).values()), 3.0)
    optimizer.step()
    clamp_logit_scale_(module)
    return float(losses.total.detach()), before


def _assert_updated(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = {n: _local(p) for n, p in _trainable(module).items()}
    assert all(torch.isfinite(v).all() for v in after.values())
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert STAGE1_PARAMETER in changed
    assert len(changed) > len(before) // 2, f"only {len(changed)} of {len(before)} parameters changed"


def test_bf16_autocast_training_step() -> None:
    device = torch.device("cuda", 0)
    objective, batch = _objective(device), _batch(device)
    loss, before = _bf16_step(objective, batch, "cuda")
    reference = float(OUT["loss_vl.total"])
    assert math.isfinite(loss)
    assert abs(loss - reference) <= BF16_LOSS_RTOL * abs(reference), (loss, reference)
    _assert_updated(objective, before)


def _captured_attention(
    model: OnePeaceModel, device_type: str = "cuda"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, H, S, E]`` and the additive bias ``[B or 1, H, S, S]`` that layer 0 receives in the joint
    text + image pass of the fixture batch (texts of different lengths, so padded keys are -inf), under autocast."""
    attn = model.encoder.layers[0].attn
    seen: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen["x"] = args[0] if args else kwargs["x"]
        seen["bias"] = args[1] if len(args) > 1 else kwargs["bias"]

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16):
            model.forward_features(text=IN["text.tokens"].to(device), image=IN["image.pixels"].to(device))
            x = seen["x"]
            b, s, d = x.shape
            q, k, v = (
                proj(x).view(b, s, attn.heads, d // attn.heads).transpose(1, 2)
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
            )
    finally:
        handle.remove()
    bias = seen["bias"]
    assert bias is not None and torch.isinf(bias).any(), "the fixture's joint pass should mask padded keys"
    return q, k, v, bias.to(q.dtype)


def test_sdpa_memory_efficient_kernel_takes_the_model_bias(official_checkpoint: Path) -> None:
    """Restricted to the memory-efficient kernel, SDPA must accept the model's bias (a silent fall-back to the math
    kernel is impossible under the restriction: an unusable kernel raises) and agree with the math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    import onepeace

    model = onepeace.load(official_checkpoint, device="cuda").model
    q, k, v, bias = _captured_attention(model)
    assert q.dtype == torch.bfloat16
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            efficient = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_efficient_attention" in ops, sorted(o for o in ops if "attention" in o)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.float())
    assert torch.isfinite(efficient).all()
    torch.testing.assert_close(efficient.float(), reference, **BF16_ATTN_TOL)


def test_fsdp2_bf16_step_on_one_gpu(tmp_path: Path) -> None:
    """FSDP2 with bf16 parameters (fp32 reduction) in a world-size-1 nccl group: the loss is the official one within
    bf16 tolerance, gradients are finite and the sharded parameters move."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from onepeace.train.distributed import wrap_model

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        objective = _objective(device)
        wrapped = wrap_model(objective, "fsdp", param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        assert isinstance(objective.model.encoder.layers[0].attn.q_proj.weight, DTensor)
        loss, before = _bf16_step(wrapped, _batch(device), "cuda")
        reference = float(OUT["loss_vl.total"])
        assert math.isfinite(loss)
        assert abs(loss - reference) <= BF16_LOSS_RTOL * abs(reference), (loss, reference)
        _assert_updated(wrapped, before)
    finally:
        dist.destroy_process_group()
