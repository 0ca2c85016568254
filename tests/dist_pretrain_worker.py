"""One data-parallel pretraining step of the tiny objective on 2 gloo ranks; run under ``torch.distributed.run``.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 dist_pretrain_worker.py OUT_DIR``. Every
rank writes ``OUT_DIR/rank<r>.pt``: for each run ``"<stage>.<strategy>"`` (see :data:`RUNS`) the total loss, every
loss term and metric, and the full gradient of every parameter after backward (DDP/FSDP already averaged it over
the ranks; FSDP2 gradients are ``DTensor`` shards, gathered here with ``full_tensor``).

The module also holds what :mod:`test_distributed_pretrain` needs to compute the single-process reference from
exactly the same objective and data: :func:`build_tiny_objective`, :func:`global_batch` and :func:`rank_slice`.

Setup, identical on every rank and in the reference:

* Model: ``onepeace-tiny`` backbone with the stage's two modalities (stage 1 text + image, stage 2 text + audio) and
  a tiny decoder (:data:`TINY_DECODER`), built by :func:`onepeace.train.build.build_objective` (seeded, stage-2
  freezing applied) and loaded with the official fixture's pretraining weights through
  :func:`onepeace.train.build.load_start_weights` (stage 2 drops the image branch and re-initialises
  ``logit_scale`` from the seed, as a real stage-2 start does). Drop path 0, float32, **eval mode** (no dropout is
  configured anyway; eval keeps every forward deterministic).
* Data: a global batch of ``WORLD * LOCAL = 6`` pairs; samples 0-2 are the fixture's texts, media and masks,
  samples 3-5 are made here from fixed seeds with the masking samplers of :mod:`onepeace.data.masking` and the
  default ratios of :class:`onepeace.data.pretrain.PretrainDataConfig`. Rank ``r`` takes rows
  ``r * LOCAL .. (r + 1) * LOCAL - 1``. Both halves are row slices of one collated batch, so every rank sees the
  same padded widths as the reference: the denoising decoder attends to padded positions (spec §10 item 13), so a
  denoising loss depends on the padded width.
* Contrastive gather: :func:`onepeace.train.distributed.all_gather_no_grad` (official: keys carry no gradient),
  ``rank`` = the process rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import official
import torch

from onepeace.checkpoints.official import official_pretrain_state
from onepeace.data.batch import MaskedView, PretrainBatch
from onepeace.data.masking import (
    collate_view,
    complementary_patch_mask,
    joint_text_mask,
    random_patch_mask,
    span_mask,
    whole_word_mask,
    with_cls,
)
from onepeace.data.pretrain import PretrainDataConfig
from onepeace.model.decoder import DecoderConfig
from onepeace.train import distributed as D
from onepeace.train.build import build_objective, load_start_weights
from onepeace.train.config import ModelConfig, TrainConfig
from onepeace.train.objectives import PretrainObjective

WORLD, LOCAL = 2, 3
"""Ranks and samples per rank; the global batch has ``WORLD * LOCAL`` samples."""
TINY_DECODER = DecoderConfig(embed_dim=32, layers=2, heads=2, ffn_dim=96)
RUNS: tuple[tuple[int, str], ...] = ((1, "ddp"), (1, "fsdp"), (2, "ddp"), (2, "fsdp"))
"""(stage, strategy) of every step the worker runs, each on a freshly built objective."""
PAD, EOS = 1, 2
EXTRA_TEXT_LENGTHS = (7, 15, 11)
"""Token counts (eos included) of the three made-up captions; 15 is the fixture's padded width."""
SEED = 3407


# ------------------------------------------------------------------------------------------ objective


def _without_modality(state: dict[str, torch.Tensor], modality: str) -> dict[str, torch.Tensor]:
    """``state`` without the keys of one modality's branch (a dotted part equal to ``modality``)."""
    return {k: v for k, v in state.items() if modality not in k.split(".")}


def build_tiny_objective(stage: int, rank: int = 0) -> PretrainObjective:
    """The stage's tiny pretraining objective with the official fixture weights, in eval mode.

    Args:
        stage: 1 (image-text) or 2 (audio-text).
        rank: process rank used for the contrastive targets.

    Returns:
        A :class:`PretrainObjective` whose contrastive gather is ``all_gather_no_grad`` (``x.detach()`` without a
        process group), identical on every rank.
    """
    model = ModelConfig(variant="onepeace-tiny", drop_path_rate=0.0, decoder=TINY_DECODER)
    cfg = TrainConfig(stage=stage, seed=SEED, precision="fp32", model=model)
    objective = build_objective(cfg, D.all_gather_no_grad, rank)
    state = official_pretrain_state(official.full_state_dict())
    if stage == 1:
        state = _without_modality(state, "audio")  # the stage-1 backbone has no audio branch
    fresh = load_start_weights(objective, state, stage)
    if fresh != ([] if stage == 1 else ["model.logit_scale"]):
        raise RuntimeError(f"unexpected parameters left at their initial values: {fresh}")
    return objective.eval()


# ------------------------------------------------------------------------------------------ data


def _fixture_views(prefix: str, names: tuple[str, ...]) -> dict[str, MaskedView]:
    inputs = official.inputs()
    return {n: MaskedView(inputs[f"{prefix}.{n}_mask_indices"], inputs[f"{prefix}.{n}_preserve_ids"]) for n in names}


def _extra_texts() -> torch.Tensor:
    """``[LOCAL, 15]`` captions made of the fixture's word tokens (rows of the official token table), eos, pad."""
    fixture = official.inputs()["text.tokens"]
    words = torch.unique(fixture[(fixture != PAD) & (fixture != EOS)])
    gen = torch.Generator().manual_seed(SEED)
    out = torch.full((LOCAL, fixture.shape[1]), PAD, dtype=torch.long)
    for i, n in enumerate(EXTRA_TEXT_LENGTHS):
        out[i, : n - 1] = words[torch.randint(len(words), (n - 1,), generator=gen)]
        out[i, n - 1] = EOS
    return out


def _text_lengths(tokens: torch.Tensor) -> list[int]:
    """Tokens (eos included) of each row of a right-padded ``[B, n]`` caption batch."""
    return [int(n) for n in (tokens != PAD).sum(dim=1)]


def _concat_views(first: MaskedView, second: MaskedView) -> MaskedView:
    """Stack two views of equal mask width along the batch; ``keep`` is re-padded with -1 to the wider one."""
    if first.mask.shape[1] != second.mask.shape[1]:
        raise ValueError(f"mask widths differ: {first.mask.shape[1]} vs {second.mask.shape[1]}")
    width = max(first.keep.shape[1], second.keep.shape[1])

    def pad(keep: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(keep, (0, width - keep.shape[1]), value=-1)

    return MaskedView(torch.cat([first.mask, second.mask]), torch.cat([pad(first.keep), pad(second.keep)]))


def _stage1_extra(text: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, dict[str, MaskedView]]:
    """Images and stage-1 views of the made-up samples (text ``[LOCAL, n]``)."""
    c, inputs = PretrainDataConfig(), official.inputs()
    pixels = inputs["image.pixels"]
    image = torch.randn(LOCAL, *pixels.shape[1:], generator=torch.Generator().manual_seed(SEED + 1))
    patches = inputs["mask_vl.image_mask_indices"].shape[1] - 1
    masks: dict[str, list[np.ndarray]] = {"text": [], "image": [], "vl_text": [], "vl_image": []}
    for n in _text_lengths(text):
        text_mask = whole_word_mask(np.ones(n, dtype=bool), c.text_mask_ratio, rng)
        image_mask = random_patch_mask(patches, c.image_mask_ratio, rng)
        masks["text"].append(with_cls(text_mask))
        masks["image"].append(with_cls(image_mask))
        masks["vl_text"].append(with_cls(joint_text_mask(n, c.vl_text_mask_ratio, text_mask, rng)))
        masks["vl_image"].append(with_cls(complementary_patch_mask(image_mask, c.vl_image_mask_ratio, rng)))
    widths = {"text": text.shape[1] + 1, "vl_text": text.shape[1] + 1, "image": patches + 1, "vl_image": patches + 1}
    return image, {name: collate_view(rows, widths[name]) for name, rows in masks.items()}


def _stage2_extra(
    text: torch.Tensor, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, dict[str, MaskedView]]:
    """Waveforms, padding masks and stage-2 views of the made-up samples (the fixture clips reordered, negated)."""
    c, inputs = PretrainDataConfig(), official.inputs()
    order = [2, 0, 1]
    waveform = -inputs["audio.waveform"][order]  # still zero-mean, unit-variance clips
    padding = inputs["audio.padding_mask"][order]  # [LOCAL, T + 1], cls column first
    span = {"span": c.audio_span, "prob_adjust": c.audio_mask_prob_adjust}
    masks: dict[str, list[np.ndarray]] = {"audio": [], "al_text": [], "al_audio": []}
    for n, pad_row in zip(_text_lengths(text), padding):
        frames = int((~pad_row).sum()) - 1
        masks["audio"].append(with_cls(span_mask(frames, c.audio_mask_ratio, rng, **span)))
        masks["al_text"].append(with_cls(whole_word_mask(np.ones(n, dtype=bool), c.al_text_mask_ratio, rng)))
        masks["al_audio"].append(with_cls(span_mask(frames, c.al_audio_mask_ratio, rng, **span)))
    widths = {"audio": padding.shape[1], "al_audio": padding.shape[1], "al_text": text.shape[1] + 1}
    return waveform, padding, {name: collate_view(rows, widths[name]) for name, rows in masks.items()}


def global_batch(stage: int) -> PretrainBatch:
    """The ``WORLD * LOCAL``-sample batch of a stage: the fixture's 3 pairs, then 3 made-up pairs."""
    inputs, rng = official.inputs(), np.random.default_rng(SEED + stage)
    extra_text = _extra_texts()
    text = torch.cat([inputs["text.tokens"], extra_text])
    if stage == 1:
        fixture = _fixture_views("mask_vl", ("text", "image", "vl_text", "vl_image"))
        extra_image, extra_views = _stage1_extra(extra_text, rng)
        views = {name: _concat_views(fixture[name], extra_views[name]) for name in fixture}
        return PretrainBatch(text=text, image=torch.cat([inputs["image.pixels"], extra_image]), views=views)
    fixture = _fixture_views("mask_al", ("audio", "al_text", "al_audio"))
    extra_wave, extra_pad, extra_views = _stage2_extra(extra_text, rng)
    return PretrainBatch(
        text=text,
        audio_waveform=torch.cat([inputs["audio.waveform"], extra_wave]),
        audio_padding_mask=torch.cat([inputs["audio.padding_mask"], extra_pad]),
        views={name: _concat_views(fixture[name], extra_views[name]) for name in fixture},
    )


def rank_slice(batch: PretrainBatch, rank: int) -> PretrainBatch:
    """Rows ``rank * LOCAL .. (rank + 1) * LOCAL - 1`` of every tensor (widths unchanged)."""
    rows = slice(rank * LOCAL, (rank + 1) * LOCAL)

    def cut(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[rows]

    return PretrainBatch(
        text=batch.text[rows],
        image=cut(batch.image),
        audio_waveform=cut(batch.audio_waveform),
        audio_padding_mask=cut(batch.audio_padding_mask),
        views={name: MaskedView(v.mask[rows], v.keep[rows]) for name, v in batch.views.items()},
    )


# ------------------------------------------------------------------------------------------ one step per rank


def full_grad(param: torch.Tensor) -> torch.Tensor | None:
    """The whole gradient of a parameter (an FSDP2 ``DTensor`` gradient is gathered from its shards)."""
    grad = param.grad
    if grad is None:
        return None
    grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    return grad.detach().clone()


def run_step(stage: int, strategy: str, rank: int) -> dict[str, torch.Tensor]:
    """Forward + backward of rank ``rank``'s half under ``strategy``; results keyed ``total``, ``term.<name>``,
    ``metric.<name>`` and ``grad.<parameter>`` (parameters without a gradient are left out)."""
    objective = build_tiny_objective(stage, rank)
    wrapped = D.wrap_model(objective, strategy)  # type: ignore[arg-type]
    out = wrapped(rank_slice(global_batch(stage), rank))
    out.total.backward()
    results = {"total": out.total.detach().clone()}
    results.update({f"term.{k}": v.detach().clone() for k, v in out.terms.items()})
    results.update({f"metric.{k}": v.detach().clone() for k, v in out.metrics.items()})
    for name, param in objective.named_parameters():  # same order on every rank: full_tensor is a collective
        grad = full_grad(param)
        if grad is not None:
            results[f"grad.{name}"] = grad
    return results


def main(out_dir: Path) -> None:
    """Run every step of :data:`RUNS` on this rank and save ``out_dir/rank<r>.pt``."""
    torch.set_num_threads(1)
    info = D.init_distributed("gloo")
    if info.world_size != WORLD:
        raise RuntimeError(f"expected {WORLD} ranks, got {info.world_size}")
    results: dict[str, torch.Tensor] = {"rank": torch.tensor(info.rank)}
    for stage, strategy in RUNS:
        step = run_step(stage, strategy, info.rank)
        results.update({f"{stage}.{strategy}.{k}": v for k, v in step.items()})
    D.barrier()
    torch.save(results, out_dir / f"rank{info.rank}.pt")
    D.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
