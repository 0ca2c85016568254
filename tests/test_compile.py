"""``compile: true``: each fusion block compiled on its own (inductor on CPU) gives the eager step's numbers."""

from __future__ import annotations

import dist_pretrain_worker as W
import pytest
import torch

from onepeace.modality import Modality
from onepeace.model.block import FusionBlock
from onepeace.train.compile import compile_blocks, is_compiled

TOL = 1e-5


def _step(objective, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = objective(batch)
    out.total.backward()
    grads = {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
    return out.total.detach(), grads


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_a_compiled_training_step_equals_eager(stage: int) -> None:
    """Loss and every gradient of one forward + backward of the tiny objective, compiled vs eager (train mode)."""
    batch = W.rank_slice(W.global_batch(stage), 0)
    eager = W.build_tiny_objective(stage).train()
    compiled = W.build_tiny_objective(stage).train()
    blocks = len(compiled.model.encoder.layers) + len(compiled.decoder.encoder.layers)
    keys = list(compiled.state_dict())
    assert compile_blocks(compiled) == blocks and compile_blocks(compiled) == 0  # once per block
    assert list(compiled.state_dict()) == keys  # parameters and their names are untouched
    assert all(is_compiled(m) for m in compiled.modules() if isinstance(m, FusionBlock))
    loss_e, grads_e = _step(eager, batch)
    loss_c, grads_c = _step(compiled, batch)
    assert abs(loss_c.item() - loss_e.item()) <= TOL
    assert set(grads_c) == set(grads_e) and len(grads_e) > 50
    worst = max((grads_c[k] - grads_e[k]).abs().max().item() for k in grads_e)
    assert worst <= TOL, worst


def test_a_fusion_block_compiles_without_graph_breaks() -> None:
    torch.manual_seed(0)
    block = FusionBlock(32, 2, 48, (Modality.TEXT, Modality.IMAGE), layer_scale_init=0.1)
    x, bias = torch.randn(2, 9, 32), torch.randn(1, 2, 9, 9)
    segments = [(Modality.TEXT, slice(0, 4)), (Modality.IMAGE, slice(4, 9))]
    explained = torch._dynamo.explain(block)(x, bias, segments)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
