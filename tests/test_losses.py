"""Pretraining losses: hand-computed cases, gradient flow, and the official criteria's values on the tiny fixture."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from onepeace.losses import ContrastiveLoss, NamedLosses, contrastive_loss, denoising_loss

# ----------------------------------------------------------------------------- contrastive


def _lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def test_contrastive_hand_computed_2x2() -> None:
    a = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    b = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    # scale 2: a @ b^T = [[0.8, 0], [0.96, 0.8]] -> logits [[1.6, 0], [1.92, 1.6]]
    #          b @ a^T = [[0.8, 0.96], [0, 0.8]] -> logits [[1.6, 1.92], [0, 1.6]]
    a2b = [_lse(1.6, 0.0) - 1.6, _lse(1.92, 1.6) - 1.6]
    b2a = [_lse(1.6, 1.92) - 1.6, _lse(0.0, 1.6) - 1.6]
    expected = 0.5 * (sum(a2b) / 2 + sum(b2a) / 2)
    res = contrastive_loss(a, b, torch.tensor(2.0))
    assert isinstance(res, ContrastiveLoss)
    assert res.loss.item() == pytest.approx(expected, rel=1e-6)
    assert res.a2b_correct.item() == 1.0  # row 1 prefers column 0 (1.92 > 1.6)
    assert res.b2a_correct.item() == 1.0  # row 0 prefers column 1 (1.92 > 1.6)
    assert res.a2b_correct.dtype == torch.float32 and not res.a2b_correct.requires_grad


def test_contrastive_perfect_alignment_and_symmetry() -> None:
    eye = torch.eye(4)
    res = contrastive_loss(eye, eye.clone(), torch.tensor(100.0))
    assert res.loss.item() < 1e-6 and res.a2b_correct == 4 and res.b2a_correct == 4
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(5, 6, generator=g), dim=-1)
    b = F.normalize(torch.randn(5, 6, generator=g), dim=-1)
    ab, ba = contrastive_loss(a, b, torch.tensor(7.0)), contrastive_loss(b, a, torch.tensor(7.0))
    torch.testing.assert_close(ab.loss, ba.loss)
    assert (ab.a2b_correct, ab.b2a_correct) == (ba.b2a_correct, ba.a2b_correct)


def test_contrastive_computes_in_float32() -> None:
    a = F.normalize(torch.randn(3, 8), dim=-1)
    b = F.normalize(torch.randn(3, 8), dim=-1)
    low = contrastive_loss(a.bfloat16(), b.bfloat16(), torch.tensor(10.0, dtype=torch.bfloat16))
    ref = contrastive_loss(a.bfloat16().float(), b.bfloat16().float(), torch.tensor(10.0))
    assert low.loss.dtype == torch.float32
    torch.testing.assert_close(low.loss, ref.loss)


def test_contrastive_gradient_only_through_local_queries_on_rank_1() -> None:
    g = torch.Generator().manual_seed(1)
    a = F.normalize(torch.randn(3, 4, generator=g), dim=-1).requires_grad_()
    b = F.normalize(torch.randn(3, 4, generator=g), dim=-1).requires_grad_()
    remote = {id(a): torch.randn(3, 4, generator=g), id(b): torch.randn(3, 4, generator=g)}

    def gather(x: torch.Tensor) -> torch.Tensor:  # rank 0 = fake remote rows, rank 1 = local rows; no gradient
        source = a if torch.equal(x, a.float()) else b
        return torch.cat([remote[id(source)], x]).detach()

    scale = torch.tensor(3.0, requires_grad=True)
    res = contrastive_loss(a, b, scale, gather=gather, rank=1)
    res.loss.backward()
    a_keys = torch.cat([remote[id(a)], a.detach()])
    b_keys = torch.cat([remote[id(b)], b.detach()])
    targets = torch.arange(3) + 3
    a2, b2, s2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_(), torch.tensor(3.0)
    s2.requires_grad_()
    expected = 0.5 * (F.cross_entropy(s2 * a2 @ b_keys.t(), targets) + F.cross_entropy(s2 * b2 @ a_keys.t(), targets))
    expected.backward()
    torch.testing.assert_close(res.loss, expected)
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)
    torch.testing.assert_close(scale.grad, s2.grad)


def test_contrastive_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="a and b"):
        contrastive_loss(torch.zeros(2, 3), torch.zeros(3, 3), torch.tensor(1.0))
    with pytest.raises(ValueError, match="rank 1"):
        contrastive_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor(1.0), gather=lambda x: x, rank=1)


# ----------------------------------------------------------------------------- denoising


def _tiny_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B=1, S=3 (cls + 2), D=2, position 1 masked: one query, K = 2 keys."""
    student = torch.tensor([[[9.0, -9.0], [3.0, 4.0], [5.0, 5.0]]])  # query row normalises to (0.6, 0.8)
    teacher = torch.tensor([[[7.0, 1.0], [2.0, 0.0], [0.0, 0.5]]])  # keys normalise to (1, 0) and (0, 1)
    mask = torch.tensor([[False, True, False]])
    return student, teacher, mask


def test_denoising_hand_computed_with_fairseq_smoothing() -> None:
    student, teacher, mask = _tiny_case()
    # logits = 2.5 * (0.6, 0.8) = (1.5, 2.0); the positive is key 0
    log_p0 = 1.5 - _lse(1.5, 2.0)
    log_p1 = 2.0 - _lse(1.5, 2.0)
    eps, k = 0.1, 2
    expected = (1 - eps - eps / (k - 1)) * (-log_p0) + eps / (k - 1) * (-log_p0 - log_p1)
    assert denoising_loss(student, teacher, mask).item() == pytest.approx(expected, rel=1e-6)
    assert denoising_loss(student, teacher, mask, label_smoothing=0.0).item() == pytest.approx(-log_p0, rel=1e-6)


def test_denoising_ignores_cls() -> None:
    student, teacher, mask = _tiny_case()
    base = denoising_loss(student, teacher, mask)
    student[0, 0], teacher[0, 0] = torch.tensor([-1.0, 5.0]), torch.tensor([0.3, 0.9])
    torch.testing.assert_close(denoising_loss(student, teacher, mask), base)
    torch.testing.assert_close(denoising_loss(student, teacher, mask | torch.tensor([[True, False, False]])), base)


def _random_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 6, 8, generator=g)
    teacher = torch.randn(2, 6, 8, generator=g)
    mask = torch.tensor([[0, 1, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    padding = torch.tensor([[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    return student, teacher, mask, padding


def test_denoising_excludes_padded_positions() -> None:
    student, teacher, mask, padding = _random_case(0)
    base = denoising_loss(student, teacher, mask, padding)
    changed = teacher.clone()
    changed[1, 4:] = torch.randn(2, 8)
    torch.testing.assert_close(denoising_loss(student, changed, mask, padding), base)
    assert not torch.allclose(denoising_loss(student, changed, mask), denoising_loss(student, teacher, mask))
    padded_mask = mask.clone()
    padded_mask[1, 5] = True  # a masked flag on a padded position is not a query
    torch.testing.assert_close(denoising_loss(student, teacher, padded_mask, padding), base)


def test_denoising_matches_torch_cross_entropy_forms() -> None:
    student, teacher, mask, padding = _random_case(1)
    keep = ~padding[:, 1:].reshape(-1)
    q = F.normalize(student[:, 1:].reshape(-1, 8)[keep], dim=-1)
    k = F.normalize(teacher[:, 1:].reshape(-1, 8)[keep], dim=-1)
    targets = mask[:, 1:].reshape(-1)[keep].nonzero().squeeze(1)
    logits = 2.5 * q[targets] @ k.t()
    plain = F.cross_entropy(logits, targets)
    torch.testing.assert_close(denoising_loss(student, teacher, mask, padding, label_smoothing=0.0), plain)
    # fairseq smoothing eps equals torch's uniform smoothing with eps * K / (K - 1)
    n_keys = k.shape[0]
    smoothed = F.cross_entropy(logits, targets, label_smoothing=0.1 * n_keys / (n_keys - 1))
    torch.testing.assert_close(denoising_loss(student, teacher, mask, padding), smoothed)


def test_denoising_gradient_reaches_student_only() -> None:
    student, teacher, mask, padding = _random_case(2)
    student.requires_grad_()
    teacher.requires_grad_()
    denoising_loss(student, teacher, mask, padding).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad[mask].abs().sum() > 0
    assert student.grad[~mask].abs().sum() == 0


def test_denoising_without_masked_tokens_is_zero_with_graph() -> None:
    student, teacher, mask, padding = _random_case(3)
    student.requires_grad_()
    loss = denoising_loss(student, teacher, torch.zeros_like(mask), padding)
    assert loss.item() == 0.0 and loss.requires_grad and loss.dtype == torch.float32
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_denoising_rejects_bad_inputs() -> None:
    student, teacher, mask, padding = _random_case(4)
    with pytest.raises(ValueError, match="student and teacher"):
        denoising_loss(student, teacher[:, :-1], mask)
    with pytest.raises(ValueError, match="mask must be a bool"):
        denoising_loss(student, teacher, mask.float())
    with pytest.raises(ValueError, match="padding_mask"):
        denoising_loss(student, teacher, mask, padding[:, :-1])


# ----------------------------------------------------------------------------- named losses


def test_named_losses_weighted_total_and_scalars() -> None:
    x = torch.tensor(2.0, requires_grad=True)
    named = NamedLosses.weighted({"itc": x * 1.5, "dcl": x.square()}, {"dcl": 0.5}, {"hits": torch.tensor(3.0)})
    assert named.total.item() == pytest.approx(3.0 + 0.5 * 4.0)
    assert dict(named.weights) == {"itc": 1.0, "dcl": 0.5}
    assert named.scalars() == {"total": 5.0, "itc": 3.0, "dcl": 4.0, "hits": 3.0}
    named.total.backward()
    assert x.grad.item() == pytest.approx(1.5 + 0.5 * 4.0)
    with pytest.raises(TypeError):
        named.terms["new"] = x  # type: ignore[index]
    with pytest.raises(ValueError, match="unknown terms"):
        NamedLosses.weighted({"itc": x}, {"itx": 1.0})


# ----------------------------------------------------------------------------- official fixture

DCL_TERMS = {
    "loss_vl.dcl_text_loss": ("loss_vl.student_text", "text.hidden", "mask_vl.text_mask_indices", "text.padding_mask"),
    "loss_vl.dcl_image_loss": ("loss_vl.student_image", "image.hidden", "mask_vl.image_mask_indices", None),
    "loss_vl.dcl_vl_text_loss": (
        "loss_vl.student_vl_text",
        "vl.text_hidden",
        "mask_vl.vl_text_mask_indices",
        "vl.text_padding_mask",
    ),
    "loss_vl.dcl_vl_image_loss": ("loss_vl.student_vl_image", "vl.image_hidden", "mask_vl.vl_image_mask_indices", None),
    "loss_al.dcl_audio_loss": (
        "loss_al.student_audio",
        "al.audio_hidden",  # the audio-only view's teacher is the joint audio-text forward
        "mask_al.audio_mask_indices",
        "al.audio_padding_mask",
    ),
    "loss_al.dcl_al_text_loss": (
        "loss_al.student_al_text",
        "al.text_hidden",
        "mask_al.al_text_mask_indices",
        "al.text_padding_mask",
    ),
    "loss_al.dcl_al_audio_loss": (
        "loss_al.student_al_audio",
        "al.audio_hidden",
        "mask_al.al_audio_mask_indices",
        "al.audio_padding_mask",
    ),
}


@pytest.mark.parametrize("name", sorted(DCL_TERMS))
def test_denoising_matches_official_criterion(name: str) -> None:
    import official

    out, inp = official.outputs(), official.inputs()
    student, teacher, mask, padding = DCL_TERMS[name]
    loss = denoising_loss(out[student], out[teacher], inp[mask], out[padding] if padding else None)
    torch.testing.assert_close(loss, out[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("stage", "other", "term", "a2b", "b2a"),
    [
        ("loss_vl", "image", "itc_loss", "i2t_ncorrect", "t2i_ncorrect"),
        ("loss_al", "audio", "atc_loss", "a2t_ncorrect", "t2a_ncorrect"),
    ],
)
def test_contrastive_and_total_match_official_criterion(stage: str, other: str, term: str, a2b: str, b2a: str) -> None:
    import official

    out = official.outputs()
    res = contrastive_loss(out[f"{other}.embedding"], out["text.embedding"], out[f"{stage}.logit_scale_exp"])
    torch.testing.assert_close(res.loss, out[f"{stage}.{term}"], atol=1e-5, rtol=1e-5)
    assert res.a2b_correct == out[f"{stage}.{a2b}"]
    assert res.b2a_correct == out[f"{stage}.{b2a}"]
    dcl = {name.split(".")[1]: out[name] for name in DCL_TERMS if name.startswith(stage)}
    weights = {name: (1.0 if name in ("dcl_image_loss", "dcl_audio_loss") else 0.5) for name in dcl}
    named = NamedLosses.weighted({term: res.loss, **dcl}, weights)
    torch.testing.assert_close(named.total, out[f"{stage}.total"], atol=1e-5, rtol=1e-5)
