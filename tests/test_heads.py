"""Classification head (spec §8.1): attention pooling worked by hand, the head's composition, key layout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from onepeace.heads import AttentionPool, ClassifyHead


def _identity_pool(dim: int, heads: int, q: list[float]) -> AttentionPool:
    pool = AttentionPool(dim, heads)
    with torch.no_grad():
        for layer in (pool.k_proj, pool.v_proj, pool.out_proj):
            layer.weight.copy_(torch.eye(dim))
        pool.v_proj.bias.zero_()
        pool.out_proj.bias.zero_()
        pool.q.copy_(torch.tensor(q).view(1, 1, heads, dim // heads))
    return pool


def test_attention_pool_by_hand_without_scaling() -> None:
    pool = _identity_pool(2, 1, [1.0, 1.0])
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # scores q.k = 1 and 2, not divided by sqrt(2)
    w1 = math.exp(1) / (math.exp(1) + math.exp(2))
    expected = torch.tensor([[w1 * 1.0, (1 - w1) * 2.0]])
    torch.testing.assert_close(pool(tokens), expected)
    torch.testing.assert_close(pool(tokens, torch.tensor([[False, True]])), torch.tensor([[1.0, 0.0]]))
    with pytest.raises(ValueError, match="only padding"):
        pool(tokens, torch.tensor([[True, True]]))


def test_attention_pool_two_heads_against_loops() -> None:
    torch.manual_seed(0)
    pool = AttentionPool(4, 2)
    with torch.no_grad():
        pool.q.normal_()
    tokens, padding = torch.randn(2, 3, 4), torch.tensor([[False, False, True], [False, False, False]])
    with torch.no_grad():
        keys, values, got = pool.k_proj(tokens), pool.v_proj(tokens), pool(tokens, padding)
    rows = []
    for b in range(2):
        heads = []
        for h in range(2):
            cols = slice(2 * h, 2 * h + 2)
            live = [s for s in range(3) if not padding[b, s]]
            scores = [float(pool.q[0, 0, h].detach() @ keys[b, s, cols]) for s in live]
            weights = [math.exp(x) / sum(math.exp(y) for y in scores) for x in scores]
            heads.append(sum(w * values[b, s, cols] for w, s in zip(weights, live)))
        rows.append(torch.cat(heads))
    with torch.no_grad():
        torch.testing.assert_close(got, pool.out_proj(torch.stack(rows)))


def test_classify_head_composition_and_two_inputs() -> None:
    torch.manual_seed(1)
    head = ClassifyHead(8, 2, num_classes=3, use_pooler=True, num_inputs=2).eval()
    a, b = torch.randn(2, 5, 8), torch.randn(2, 4, 8)
    pad_b = torch.tensor([[False, False, False, True], [False] * 4])
    pooled = [
        head.pooler(head.norm(head.attn_pooling_func(a[:, 1:]))),
        head.pooler(head.norm(head.attn_pooling_func(b[:, 1:], pad_b[:, 1:]))),
    ]
    torch.testing.assert_close(head((a, None), (b, pad_b)), head.classifier(torch.cat(pooled, dim=-1)))
    assert isinstance(head.classifier[2], nn.GELU) and head.classifier[0].weight.shape == (16, 16)
    with pytest.raises(ValueError, match="2 segment"):
        head((a, None))
    cls_head = ClassifyHead(8, 2, num_classes=3, attn_pooling=False).eval()
    torch.testing.assert_close(cls_head((a, None)), cls_head.classifier(a[:, 0]))


def test_classify_head_keys_follow_the_official_layout() -> None:
    head = ClassifyHead(16, 4, num_classes=5, use_pooler=True)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "attn_pooling_func.q": (1, 1, 4, 4),
        "attn_pooling_func.k_proj.weight": (16, 16),
        "attn_pooling_func.v_proj.weight": (16, 16),
        "attn_pooling_func.v_proj.bias": (16,),
        "attn_pooling_func.out_proj.weight": (16, 16),
        "attn_pooling_func.out_proj.bias": (16,),
        "norm.weight": (16,),
        "norm.bias": (16,),
        "pooler.1.weight": (16, 16),
        "pooler.1.bias": (16,),
        "classifier.0.weight": (32, 16),
        "classifier.0.bias": (32,),
        "classifier.1.weight": (32,),
        "classifier.1.bias": (32,),
        "classifier.3.weight": (5, 32),
        "classifier.3.bias": (5,),
    }
