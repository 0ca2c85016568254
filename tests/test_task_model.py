"""Task models (spec §8): routing per task kind, NLVR2 type embeddings, the vision-branch head, official
fine-tuned key layout, and the task losses on their outputs."""

from __future__ import annotations

import copy

import official
import pytest
import torch

from onepeace.checkpoints.official import official_task_state
from onepeace.checkpoints.official_keys import sort_keys, to_official
from onepeace.finetune.batch import TaskBatch
from onepeace.finetune.model import TaskModel
from onepeace.finetune.objective import task_loss
from onepeace.finetune.tasks import TASKS, TaskKind, get_task
from onepeace.model import OnePeaceModel
from onepeace.variants import get_variant

B, K, N_TEXT = 3, 4, 7


def make_task(name: str, num_classes: int | None = None, seed: int = 0) -> TaskModel:
    spec = get_task(name)
    torch.manual_seed(seed)
    cfg = get_variant("onepeace-tiny").replace(modalities=spec.modalities, per_layer_rel_pos=True)
    return TaskModel(OnePeaceModel(cfg), spec, num_classes or min(spec.num_classes, 5) or 1).eval()


def make_batch(name: str, classes: int = 5) -> TaskBatch:
    spec, g = get_task(name), torch.Generator().manual_seed(1)
    rows = B * (K if spec.kind is TaskKind.AQA else 1)
    text = torch.randint(4, 1000, (rows, N_TEXT), generator=g)
    text[:, -1] = 2  # eos
    wave = torch.randn(B, 16000, generator=g)
    pad = torch.zeros(B, get_variant("onepeace-tiny").audio.num_frames(16000) + 1, dtype=torch.bool)
    return TaskBatch(
        ids=tuple(str(i) for i in range(B)),
        text=text,
        image=torch.randn(B, 3, 64, 64, generator=g),
        image2=torch.randn(B, 3, 64, 64, generator=g),
        audio_waveform=wave,
        audio_padding_mask=pad,
        labels=torch.tensor([0, 1, 2]) % (K if spec.kind is TaskKind.AQA else classes),
        soft_targets=torch.rand(B, classes, generator=g),
        boxes=torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.4, 0.9]]),
        original_sizes=torch.tensor([[100.0, 80.0], [64.0, 64.0], [120.0, 90.0]]),
        group=torch.arange(B),
        num_choices=K if spec.kind is TaskKind.AQA else 1,
    )


@pytest.mark.parametrize("name", sorted(n for n, s in TASKS.items() if s.trainable))
def test_every_trainable_task_gives_its_output_shape_and_a_finite_loss_with_gradients(name: str) -> None:
    classes = min(get_task(name).num_classes, 5) or 1
    task, batch = make_task(name).train(), make_batch(name, classes)
    out = task(batch)
    kind = task.spec.kind
    if kind is TaskKind.RETRIEVAL:
        assert out.text.shape == out.media.shape == (B, 64)
        assert torch.allclose(out.media.norm(dim=-1), torch.ones(B), atol=1e-5)
    else:
        expected = (B, K) if kind is TaskKind.AQA else (B, classes)
        assert out.logits.shape == expected
    if kind is TaskKind.GROUNDING:
        assert ((out.logits > 0) & (out.logits < 1)).all()
    scale = task.model.logit_scale_exp() if kind is TaskKind.RETRIEVAL else None
    loss = task_loss(task.spec, out, batch, scale)
    assert torch.isfinite(loss.total)
    loss.total.backward()
    trained = [p for p in (task.head or task.model.projections).parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trained)  # (k_proj gets 0 while the pooling query is still 0)
    last = task.head.classifier[3].weight if hasattr(task.head, "classifier") else trained[0]
    assert last.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.model.encoder.parameters())


def test_classification_uses_only_the_media_branch() -> None:
    task, batch = make_task("vggsound"), make_batch("vggsound")
    no_text = TaskBatch(**{**batch.__dict__, "text": None})
    with torch.no_grad():
        assert torch.equal(task(batch).logits, task(no_text).logits)
    assert task.model.modalities == (get_task("vggsound").media,)


def test_aqa_scores_follow_their_choices() -> None:
    task, batch = make_task("aqa"), make_batch("aqa")
    order = torch.tensor([2, 0, 3, 1])
    rows = (torch.arange(B)[:, None] * K + order[None, :]).reshape(-1)
    permuted = TaskBatch(**{**batch.__dict__, "text": batch.text[rows]})
    with torch.no_grad():
        assert torch.allclose(task(permuted).logits, task(batch).logits[:, order], atol=1e-5)


def test_type_embeddings_act_as_shifted_absolute_positions() -> None:
    """Adding a type vector to every position equals adding it to every used row of the position table."""
    task, batch = make_task("nlvr2"), make_batch("nlvr2")
    g = torch.Generator().manual_seed(5)
    vectors = {name: torch.randn(1, 1, 64, generator=g) for name in ("text", "image", "image_2")}
    with torch.no_grad():
        for name, value in vectors.items():
            task.type_embeddings[name].copy_(value)
        typed = task(batch).logits
        shifted = copy.deepcopy(task)
        for p in shifted.type_embeddings.values():
            p.zero_()
        shifted.model.adapters["text"].pos_embed.weight.add_(vectors["text"][0])
        shifted.model.adapters["image"].pos_embed.add_(vectors["image"][0])
        first = shifted._typed_pass(batch.text, batch.image, second=False)
        shifted.model.adapters["image"].pos_embed.add_(vectors["image_2"][0])
        second = shifted._typed_pass(batch.text, batch.image2, second=True)
        expected = shifted.head((first.hidden, first.padding_mask), (second.hidden, second.padding_mask))
        assert torch.allclose(typed, expected, atol=1e-5)
        assert not torch.allclose(typed, make_task("nlvr2")(batch).logits, atol=1e-3)


def test_image_classification_pools_the_last_layer_before_the_final_norm() -> None:
    task, batch = make_task("imagenet"), make_batch("imagenet")
    with torch.no_grad():
        last = task.model.forward_intermediates(image=batch.image)[-1]
        pooled = torch.nn.functional.layer_norm(
            last[:, 1:].mean(1), (64,), task.head.fc_norm.weight, task.head.fc_norm.bias, 1e-5
        )
        expected = pooled @ task.head.fc.weight.t() + task.head.fc.bias
        assert torch.allclose(task(batch).logits, expected, atol=1e-5)
    assert task.head.fc.weight.std() < 0.02 * 0.001 * 1.5  # official head_init_scale


def test_official_nlvr2_layout_round_trips_with_type_embeddings() -> None:
    source, batch = make_task("nlvr2", num_classes=2, seed=3), make_batch("nlvr2", classes=2)
    with torch.no_grad():
        for p in source.type_embeddings.values():
            p.normal_()
    official_sd = {}
    for key, value in source.state_dict().items():
        ours = key.removeprefix("model.")
        name = to_official(ours)
        assert name is not None, key
        official_sd[name] = value.clone()
    assert "encoder_wrapper.image_adapter.type_embedding_2" in official_sd
    assert "classify_head.classifier.0.weight" in official_sd and official_sd[
        "classify_head.classifier.0.weight"
    ].shape == (128, 128)
    report = sort_keys(list(official_sd))
    assert report.unknown == [] and len([k for k in report.head if "type_embedding" in k]) == 3
    target = make_task("nlvr2", num_classes=2, seed=4)
    result = target.load_state_dict(official_task_state(official_sd), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    with torch.no_grad():
        assert torch.equal(target(batch).logits, source(batch).logits)


def test_official_classify_file_loads_into_the_vggsound_task_model() -> None:
    """The fixture's audio branch plus a head in the classify layout, as a released VGGSound file holds it."""
    sd = {k: v for k, v in official.inference_state_dict().items() if "text" not in k and "image" not in k}
    source = make_task("vggsound", num_classes=5)
    sd.update({f"classify_head.{k}": v.clone() for k, v in source.head.state_dict().items()})
    sd = {k: v for k, v in sd.items() if not k.startswith(("audio_proj", "logit_scale"))}
    state = official_task_state(sd)
    assert not any(k.startswith("model.projections") for k in state)
    target = make_task("vggsound", num_classes=5, seed=9)
    from onepeace.checkpoints.state import per_layer_tables

    backbone = per_layer_tables({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}, 2)
    full = {
        **{f"model.{k}": v for k, v in backbone.items()},
        **{k: v for k, v in state.items() if k.startswith("head.")},
    }
    result = target.load_state_dict(full, strict=False)
    assert set(result.missing_keys) == {
        "model.projections.audio.weight",
        "model.projections.audio.bias",
        "model.logit_scale",
    }
    assert result.unexpected_keys == []
    assert torch.equal(target.head.classifier[3].weight, source.head.classifier[3].weight)
