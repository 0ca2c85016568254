"""Per-block ``torch.compile``: every fusion layer's forward becomes one compiled graph (as torchtitan compiles each
transformer block), applied between building the model and wrapping it for data parallelism.

Compiling block by block keeps compile time to one graph per distinct block input layout, keeps the parameters and
their names where they are (checkpoints and FSDP sharding are unchanged: only ``forward`` is replaced), and leaves
the parts with data-dependent control flow (adapters, losses) eager.
"""

from __future__ import annotations

from typing import Any

from torch import nn

RECOMPILE_LIMIT = 64
"""Graphs dynamo may keep for the (shared) block forward before it stops compiling new layouts."""


def compile_blocks(module: nn.Module, **options: Any) -> int:
    """Compile the ``forward`` of every :class:`~onepeace.model.block.FusionBlock` inside ``module`` in place.

    Args:
        module: a model, an objective (backbone and decoder layers) or a task model.
        options: passed to :func:`torch.compile` (defaults ``fullgraph=True``: a graph break is an error;
            ``dynamic=True``: one graph serves every sequence length).

    Returns:
        The number of blocks compiled (0 if ``module`` has none or they are compiled already). Module hooks (FSDP's
        all-gathers, activation checkpointing) stay outside the compiled graphs.
    """
    import torch

    from onepeace.model.block import FusionBlock

    options = {"fullgraph": True, "dynamic": True, **options}
    # One graph per input layout (which modalities, bias absent / broadcast / per sample, grad mode), shared by
    # every block; a pretraining step has up to ~12 layouts, more than dynamo's default of 8 per function.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    compiled = 0
    for block in module.modules():
        if isinstance(block, FusionBlock) and "forward" not in vars(block):
            block.forward = torch.compile(block.forward, **options)
            compiled += 1
    return compiled


def is_compiled(block: nn.Module) -> bool:
    """True if :func:`compile_blocks` replaced ``block.forward``."""
    return "forward" in vars(block)
