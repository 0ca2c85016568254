"""Per-step cost of the model and the pretraining objective: the joint attention bias, host syncs, pinned batches."""

from __future__ import annotations

from collections import Counter

import dist_pretrain_worker as W
import official
import pytest
import torch
from host_syncs import count_host_syncs

from onepeace.data.batch import MaskedView, PretrainBatch, pin_memory_for
from onepeace.model import OnePeaceModel
from onepeace.model import encoder as E
from onepeace.variants import get_variant

IN = official.inputs()


def tiny() -> OnePeaceModel:
    torch.manual_seed(0)
    model = OnePeaceModel(get_variant("onepeace-tiny"))
    for name, param in model.named_parameters():  # non-zero relative-position tables, so the bias matters
        if "rel_pos" in name:
            torch.nn.init.normal_(param, std=0.5)
    return model.eval()


def _recording(monkeypatch, expand: bool = False) -> list[torch.Tensor]:
    """Record every joint bias built; ``expand``: hand the layers a ``[B, ...]`` copy (the former behaviour)."""
    built: list[torch.Tensor] = []
    original = E.joint_bias

    def record(inputs, padding_mask, table, dtype=None):
        bias = original(inputs, padding_mask, table, dtype)
        built.append(bias)
        if expand:
            bias = bias.expand(padding_mask.shape[0], -1, -1, -1).contiguous().to(inputs[0].rel_pos_bias[0].dtype)
        return bias

    monkeypatch.setattr(E, "joint_bias", record)
    return built


@torch.no_grad()
def test_unpadded_image_bias_is_built_once_and_broadcast(monkeypatch) -> None:
    model, pixels = tiny(), IN["image.pixels"]
    built = _recording(monkeypatch)
    out = model.forward_features(image=pixels).image.hidden
    layers, heads, seq = model.cfg.layers, model.cfg.heads, pixels.shape[-1] // 16 * (pixels.shape[-1] // 16) + 1
    assert layers > 1 and len(built) == 1 and built[0].shape == (1, heads, seq, seq)
    monkeypatch.undo()
    expanded = _recording(monkeypatch, expand=True)
    reference = model.forward_features(image=pixels).image.hidden
    assert len(expanded) == 1 and torch.equal(out, reference)  # broadcasting [1, ...] = the per-sample copy, bitwise


@torch.no_grad()
def test_padded_joint_bias_is_per_sample_and_in_the_compute_dtype(monkeypatch) -> None:
    model = tiny()
    built = _recording(monkeypatch)
    feats = model.forward_features(text=IN["text.tokens"], image=IN["image.pixels"])
    batch = IN["text.tokens"].shape[0]
    assert len(built) == 1 and built[0].shape[0] == batch and built[0].dtype == torch.float32
    padded = torch.cat([feats.text.padding_mask, feats.image.padding_mask], dim=1)  # [B, S_total]
    assert padded.any() and torch.isinf(built[0][:, :, :, padded.any(0)]).any()  # -inf at padded keys
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.forward_features(text=IN["text.tokens"], image=IN["image.pixels"])
        model.forward_features(image=IN["image.pixels"])
    assert [b.dtype for b in built[1:]] == [torch.bfloat16, torch.bfloat16]  # no cast per layer
    assert built[2].shape[0] == 1


def _micro_batch(stage: int):
    """Forward + backward of one training micro-batch of the tiny objective (losses stay tensors)."""
    objective = W.build_tiny_objective(stage).train()
    batch = W.rank_slice(W.global_batch(stage), 0)

    def step() -> None:
        out = objective(batch)
        out.total.backward()

    return step


@pytest.mark.parametrize("stage", [1, 2])
def test_a_training_micro_batch_has_no_host_sync(stage: int) -> None:
    """Before: 48 (stage 1) and 42 (stage 2) host syncs per micro-batch: token and kept-position range checks,
    boolean-mask indexing in the decoder and the denoising loss, and ``nonzero`` there. Now the value checks are
    device-side asserts (``torch._assert_async``) and the losses size their index lists from counts the data
    layer takes on the host, so none remains."""
    syncs = count_host_syncs(_micro_batch(stage))
    assert syncs == Counter(), syncs


def test_the_counter_sees_the_syncs_it_is_meant_to() -> None:
    x = torch.tensor([1.0, 0.0, 2.0])
    counts = count_host_syncs(lambda: (x.sum().item(), bool(x.any()), x[x > 0], x.nonzero(), x.tolist()))
    assert sum(counts.values()) == 5 and {kind for kind, _ in counts} == {"scalar", "index", "shape"}


def test_counts_are_taken_on_the_host_and_travel_with_the_batch() -> None:
    batch = W.rank_slice(W.global_batch(2), 0)
    assert batch.num_text_tokens == int((batch.text != 1).sum())
    assert batch.num_audio_frames == int((~batch.audio_padding_mask[:, 1:]).sum())
    assert batch.views["audio"].num_masked == int(batch.views["audio"].mask[:, 1:].sum())
    moved = batch.to("meta")  # off the host nothing is counted, the host counts are kept
    assert moved.num_text_tokens == batch.num_text_tokens and moved.views["audio"].num_masked is not None
    assert MaskedView(torch.zeros(2, 3, dtype=torch.bool, device="meta"), torch.zeros(2, 1)).num_masked is None


def test_a_wrong_count_fails_loudly() -> None:
    from onepeace.losses.denoising import denoising_loss

    student, mask = torch.randn(2, 4, 8), torch.tensor([[0, 1, 0, 1], [0, 0, 1, 0]], dtype=torch.bool)
    exact = denoising_loss(student, student, mask)
    assert torch.equal(denoising_loss(student, student, mask, num_queries=3), exact)
    with pytest.raises(RuntimeError, match="num_queries = 2 does not match the masks"):
        denoising_loss(student, student, mask, num_queries=2)


def test_model_value_checks_remain() -> None:
    model = tiny()
    bad = torch.tensor([[5, 50264, 2]])
    with pytest.raises(ValueError, match="token id 50264 is outside the vocabulary"):
        model.encode_text(bad)
    with pytest.raises(RuntimeError, match=r"a token id is outside the vocabulary \(0..50263\)"):
        model.forward_features(text=bad, check_values=False)
    keep = torch.tensor([[0, 1, 9]])
    with pytest.raises(RuntimeError, match=r"text: kept positions must lie in -1..3"):
        model.forward_features(text=torch.tensor([[5, 6, 2]]), keep={"text": keep})
    with pytest.raises(RuntimeError, match="the cls position 0 must be kept first"):
        model.forward_features(text=torch.tensor([[5, 6, 2]]), keep={"text": torch.tensor([[1, 2]])})


class _Recorder(torch.Tensor):
    """A tensor subclass that records the ``non_blocking`` flag of every ``to`` call."""

    flags: list[bool] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            cls.flags.append(bool(kwargs.get("non_blocking", False)))
        return super().__torch_function__(func, types, args, kwargs)


def test_non_blocking_reaches_every_copy() -> None:
    from onepeace.finetune.batch import TaskBatch

    def rec(x: torch.Tensor) -> torch.Tensor:
        return x.as_subclass(_Recorder)

    view = MaskedView(rec(torch.zeros(2, 3, dtype=torch.bool)), rec(torch.zeros(2, 2, dtype=torch.long)))
    batch = PretrainBatch(text=rec(torch.ones(2, 3, dtype=torch.long)), image=rec(torch.zeros(2, 3, 16, 16)))
    batch = PretrainBatch(text=batch.text, image=batch.image, views={"text": view})
    _Recorder.flags = []
    batch.to("cpu", non_blocking=True)
    assert _Recorder.flags == [True] * 4
    task = TaskBatch(ids=("a", "b"), text=rec(torch.ones(2, 3, dtype=torch.long)), labels=rec(torch.zeros(2)))
    _Recorder.flags = []
    task.to("cpu", non_blocking=True)
    task.to("cpu")
    assert _Recorder.flags == [True, True, False, False]


def test_loaders_pin_only_for_cuda(monkeypatch) -> None:
    assert pin_memory_for("cpu") is False and pin_memory_for(torch.device("cuda", 1)) is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pin_memory_for(None) is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pin_memory_for(None) is True
