"""Process groups, cross-rank gathers and data-parallel wrappers for runs launched with ``torchrun``.

The model itself never touches :mod:`torch.distributed`; everything parallel is applied from here. Backends: gloo on
CPU, nccl on CUDA. Without ``torchrun`` every helper degrades to the single-process case (world size 1).

Glossary: B local batch, W world size.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

Strategy = Literal["none", "ddp", "fsdp"]
STRATEGIES: tuple[str, ...] = ("none", "ddp", "fsdp")
FUSION_LAYER_PATTERN = r"(^|\.)(encoder|decoder)\.layers\.\d+$"
"""Submodules sharded one by one under FSDP (fusion and decoder layers), matched against ``named_modules`` names."""
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_ENV = "ONEPEACE_DIST_TIMEOUT"
"""Environment variable giving the collective timeout in seconds."""
DEFAULT_TIMEOUT_SECONDS = 1800.0
"""Collective timeout without ``ONEPEACE_DIST_TIMEOUT``: a rank stuck for 30 minutes fails the job."""
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""Config spellings of the FSDP mixed-precision dtypes."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 .. world_size - 1).
        world_size: number of processes.
        local_rank: rank on this machine; selects the CUDA device.
        device: the device this process computes on.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that logs and writes checkpoints)."""
        return self.rank == 0


def init_distributed(backend: str | None = None, timeout: float | None = None) -> DistInfo:
    """Join the process group described by the ``torchrun`` environment, or fall back to one process.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; by default nccl when CUDA is available, else gloo. With ``"gloo"`` the
            device is the CPU even if CUDA is present.
        timeout: seconds a collective may wait before the job fails (see :func:`dist_timeout`); None reads
            ``ONEPEACE_DIST_TIMEOUT`` or uses :data:`DEFAULT_TIMEOUT_SECONDS`.

    Returns:
        DistInfo. Launched by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set), the
        default process group is initialised (once) with ``env://``, the timeout and, on CUDA, ``device_id`` (the
        communicator is bound to this rank's GPU at once); otherwise rank 0 of a world of 1 with no process group,
        on ``cuda:0`` when available.
    """
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if not all(name in os.environ for name in _TORCHRUN_ENV):
        return DistInfo(0, 1, 0, torch.device("cuda", 0) if use_cuda else torch.device("cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        chosen = backend or ("nccl" if use_cuda else "gloo")
        dist.init_process_group(
            backend=chosen,
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=dist_timeout(timeout),
            device_id=device if use_cuda else None,
        )
    return DistInfo(rank, world, local_rank, device)


def dist_timeout(seconds: float | None = None) -> timedelta:
    """How long a collective may wait: ``seconds``, else ``ONEPEACE_DIST_TIMEOUT`` (seconds), else 30 minutes.

    Raises ``ValueError`` for a value that is not a positive number of seconds.
    """
    source = "timeout"
    if seconds is None and TIMEOUT_ENV in os.environ:
        source, text = TIMEOUT_ENV, os.environ[TIMEOUT_ENV]
        try:
            seconds = float(text)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None
    if seconds is None:
        seconds = DEFAULT_TIMEOUT_SECONDS
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{source} must be a positive, finite number of seconds, got {seconds!r}")
    return timedelta(seconds=seconds)


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 or without a process group."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Tear the default process group down while the interpreter is fully alive (no-op without one).

    Call it once the run's modules are unreachable: garbage collection first frees FSDP2 modules, which keep the
    process group and its finished gloo work alive; a barrier then lets every rank's last collective settle before
    the group is destroyed. Left to interpreter exit, a gloo worker thread releasing that work needs the GIL
    during finalisation and the process aborts ("terminate called without an active exception").
    """
    import gc

    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    gc.collect()


def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0, without gradient (the official contrastive gather).

    Every rank must pass the same shape. The result is detached everywhere, the local slice included, so a loss using
    it as keys back-propagates only through its other (query) operand.

    Args:
        x: ``[B, ...]`` local tensor.

    Returns:
        ``[B * W, ...]`` in rank order, detached (``x.detach()`` when W = 1).
    """
    world = get_world_size()
    if world == 1:
        return x.detach()
    with torch.no_grad():
        local = x.detach().contiguous()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local)
    return torch.cat(parts, dim=0)  # [B * W, ...]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the incoming gradient over ranks and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        local = x.contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        ctx.rows = x.shape[0]
        ctx.rank = dist.get_rank()
        return torch.cat(parts, dim=0)  # [B * W, ...]

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        total = grad.contiguous().clone()  # [B * W, ...]; all_reduce works in place
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return total[start : start + ctx.rows]  # [B, ...]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping the autograd graph.

    Backward sums the gradient of the gathered tensor over ranks and hands each rank its own slice. If rank ``r``
    computes a loss ``L_r`` from the result, the gradient reaching ``x`` on rank ``r`` is therefore
    ``d(sum_j L_j) / d x_r``; after DDP/FSDP average parameter gradients over ranks, parameters receive the gradient
    of ``mean_j L_j`` (for per-rank mean losses: the loss of the concatenated batch on one device). Every rank must
    pass the same shape and must run backward. Works on gloo (only all_gather and all_reduce are used).

    Args:
        x: ``[B, ...]`` local tensor.

    Returns:
        ``[B * W, ...]`` in rank order (``x`` itself when W = 1).
    """
    if get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def reduce_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over ranks, detached, for logging (``x.detach()`` when W = 1). Same shape as ``x``."""
    out = x.detach().clone()
    world = get_world_size()
    if world > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)  # gloo has no AVG
        out = out / world
    return out


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Turn on activation checkpointing through each submodule's own ``set_grad_checkpointing(True)``.

    Call it before :func:`wrap_model`. Returns how many modules (``model`` or its descendants) have the method;
    0 means nothing was changed.
    """
    enabled = 0
    for module in model.modules():
        setter = getattr(module, "set_grad_checkpointing", None)
        if callable(setter):
            setter(True)
            enabled += 1
    return enabled


def wrap_model(
    module: nn.Module,
    strategy: Strategy = "none",
    *,
    find_unused_parameters: bool = False,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
    forward_methods: Sequence[str] = (),
    layer_pattern: str = FUSION_LAYER_PATTERN,
    device: torch.device | None = None,
) -> nn.Module:
    """Wrap ``module`` (already on this rank's device) for data-parallel training.

    Args:
        module: the model or objective module; parameters must be identical on all ranks (same seed or a load).
        strategy: ``"none"`` (returned unchanged), ``"ddp"`` (:class:`~torch.nn.parallel.DistributedDataParallel`)
            or ``"fsdp"`` (FSDP2 ``fully_shard``). Without a process group the module is returned unchanged.
        find_unused_parameters: DDP only; needed when some parameters get no gradient in a step (other modalities'
            branches, frozen parts in stage 2).
        param_dtype: FSDP only; compute/all-gather dtype of the unsharded parameters, e.g. ``torch.bfloat16`` for
            the bf16 policy. ``None`` keeps the stored dtype. Sharded master weights stay in their own dtype.
        reduce_dtype: FSDP only; dtype of gradient reduction (default float32: bf16 compute, fp32 reduce).
        reshard_after_forward: FSDP only; free each layer's gathered parameters after its forward.
        forward_methods: FSDP only; methods other than ``forward`` that are called on the root from outside
            (e.g. ``"encode_text"``); FSDP hooks only ``forward`` unless told.
        layer_pattern: FSDP only; regex over ``named_modules`` names selecting submodules sharded as their own
            unit before the root (default: ``encoder.layers.<i>`` and ``decoder.layers.<i>``).
        device: the device the module computes on; by default that of its first parameter (give it for a module
            still on the meta device, sharded before it is materialised).

    FSDP notes: 0-d parameters (``logit_scale``) cannot be sharded by ``fully_shard``; they stay replicated plain
    tensors, excluded from FSDP, and a gradient hook averages their gradient over ranks. They are also not cast by
    ``param_dtype``; every rank must produce their gradient in every backward (the hook is a collective).
    Gradients of sharded parameters are averaged over ranks, as under DDP. ``fully_shard`` converts ``module`` in
    place (the same object is returned). With ``param_dtype=torch.bfloat16`` every modality runs: the image stem and
    the audio extractor cast their inputs to the dtype of their own (gathered) weights. :func:`wrap_kwargs` maps a
    recipe's ``precision`` and ``fsdp_*_dtype`` fields to these arguments.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy == "none" or not dist.is_initialized():
        return module
    device = device if device is not None else next(module.parameters()).device  # given for a meta module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused_parameters)
    return _fully_shard(
        module, device, param_dtype, reduce_dtype, reshard_after_forward, forward_methods, layer_pattern
    )


def mixed_precision_kwargs(
    precision: str, param_dtype: str = "auto", reduce_dtype: str = "fp32"
) -> dict[str, torch.dtype | None]:
    """The FSDP2 ``param_dtype`` / ``reduce_dtype`` arguments of :func:`wrap_model` for a recipe.

    Args:
        precision: the recipe's compute precision, ``"fp32"`` or ``"bf16"`` (autocast).
        param_dtype: dtype parameters are all-gathered and computed in: ``"auto"`` (bf16 under ``precision: bf16``,
            else the stored fp32), ``"fp32"`` or ``"bf16"``.
        reduce_dtype: dtype gradients are reduce-scattered in, ``"fp32"`` or ``"bf16"``.

    Returns:
        ``{"param_dtype": dtype or None, "reduce_dtype": dtype}``; ``None`` keeps the stored dtype.
    """
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    if param_dtype not in (*DTYPES, "auto"):
        raise ValueError(f"fsdp_param_dtype must be one of auto, {', '.join(DTYPES)}, got {param_dtype!r}")
    if reduce_dtype not in DTYPES:
        raise ValueError(f"fsdp_reduce_dtype must be one of {', '.join(DTYPES)}, got {reduce_dtype!r}")
    if param_dtype == "auto":
        param_dtype = "bf16" if precision == "bf16" else "fp32"
    param = DTYPES[param_dtype]
    return {"param_dtype": None if param == torch.float32 else param, "reduce_dtype": DTYPES[reduce_dtype]}


def wrap_kwargs(cfg: Any) -> dict[str, Any]:
    """Keyword arguments of :func:`wrap_model` from a ``TrainConfig`` or ``FinetuneConfig``.

    Reads ``precision``, ``fsdp_param_dtype``, ``fsdp_reduce_dtype`` and (when the config has it)
    ``find_unused_parameters``: ``wrap_model(module, cfg.strategy, **wrap_kwargs(cfg))``.
    """
    kwargs: dict[str, Any] = dict(mixed_precision_kwargs(cfg.precision, cfg.fsdp_param_dtype, cfg.fsdp_reduce_dtype))
    kwargs["find_unused_parameters"] = bool(getattr(cfg, "find_unused_parameters", False))
    return kwargs


def _fully_shard(
    module: nn.Module,
    device: torch.device,
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype | None,
    reshard_after_forward: bool,
    forward_methods: Sequence[str],
    layer_pattern: str,
) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    scalars = {p for p in module.parameters() if p.ndim == 0}
    pattern = re.compile(layer_pattern)
    layers = [m for name, m in module.named_modules() if name and pattern.search(name)]
    for layer in layers:
        fully_shard(
            layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward, ignored_params=scalars
        )
    fully_shard(module, mesh=mesh, mp_policy=policy, ignored_params=scalars)
    for param in scalars:
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(_average_grad)
    for name in forward_methods:
        register_fsdp_forward_method(module, name)
    return module


def _average_grad(param: Tensor) -> None:
    """Average ``param.grad`` over ranks in place (replicated parameters FSDP does not manage)."""
    if param.grad is not None:
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad.div_(dist.get_world_size())


def full_model_state(module: nn.Module) -> dict[str, Tensor]:
    """Full (unsharded) state dict of an FSDP2 module, on CPU on rank 0 (empty elsewhere); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_state_dicts(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Full (unsharded) model and optimizer state of an FSDP2 module, on CPU on rank 0 (empty elsewhere).

    A collective: every rank must call it. The optimizer state is keyed by parameter name.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return full_model_state(module), get_optimizer_state_dict(module, optimizer, options=options)


def load_full_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Tensor], optimizer_state: dict[str, Any]
) -> None:
    """Load full state dicts (as written by :func:`full_state_dicts`) into an FSDP2 module and its optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, model_state, options=options)
    set_optimizer_state_dict(module, optimizer, optimizer_state, options=options)
