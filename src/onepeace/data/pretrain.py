"""Pretraining data: configuration, collation and the loader (spec §5.4, §6).

Stage 1 pairs images with captions, stage 2 audio clips with captions. Per example
(:mod:`.pretrain_examples`): the caption is normalised
(:meth:`Tokenizer.normalize`) and encoded (``max_text_tokens`` ids + eos); an image gets a random resized crop
(scale ``crop_scale``, aspect ``crop_ratio``, bicubic, no flip) and CLIP normalisation; a clip is loaded at
16 kHz and prepared as in the API (standardised, first ``max_duration`` s, tiled to 1 s). Then the masks of the
stage's denoising views are drawn (:mod:`.masking`). All randomness of an example comes from a generator seeded
with ``(seed, epoch, slot)``, so a batch depends only on the loader arguments.

Records are read from TSV files (:mod:`.pretrain_sources`) or tar shards (:mod:`.pretrain_shards`); bad records
are replaced and counted (``LoadedBatch.skipped``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from onepeace.config import AudioAdapterConfig
from onepeace.data.audio import collate_audio
from onepeace.data.batch import VIEWS_STAGE1, VIEWS_STAGE2, PretrainBatch, pin_memory_for
from onepeace.data.masking import collate_view
from onepeace.data.pretrain_examples import Example, ExampleMaker
from onepeace.data.pretrain_shards import ShardPretrainDataset, expand_shards, plan_shards
from onepeace.data.pretrain_sources import EpochBatchSampler, TsvIndex, TsvPretrainDataset
from onepeace.data.shard_manifest import shard_counts
from onepeace.data.tokenizer import PAD_ID

PATCH_SIZE = 16
TSV_COLUMNS = {1: ("image_id", "image", "caption"), 2: ("uniq_id", "audio", "text")}
SHARD_MEDIA_KEYS = {1: ("jpg", "png", "jpeg"), 2: ("wav", "flac", "ogg")}
SHARD_TEXT_KEY = "txt"


@dataclass(frozen=True)
class PretrainDataConfig:
    """Data of one pretraining stage (defaults: the official recipe, spec §5.1, §5.4, §6.2)."""

    paths: tuple[str, ...] = ()
    """TSV files (concatenated) or tar shards (brace ranges and glob patterns allowed)."""
    format: str = "tsv"
    """``"tsv"`` (header row; image-text ``image_id, image, caption``, audio-text ``uniq_id, audio, text,
    duration``) or ``"webdataset"`` (members ``<key>.jpg|png|jpeg`` or ``<key>.wav|flac|ogg`` plus ``<key>.txt``)."""
    root: str | None = None
    """Directory the TSV media paths are relative to (default: the directory of each TSV file)."""
    stage: int = 1
    """1 = image-text, 2 = audio-text."""
    batch_size: int = 32
    """Examples per batch on each rank."""
    num_workers: int = 2
    """Loader worker processes per rank (0 = load in the training process)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    image_size: int = 256
    """Side of the square training crop in pixels (a multiple of 16)."""
    crop_scale: tuple[float, float] = (0.9, 1.0)
    """Area fraction range of the random resized crop."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Aspect ratio (width / height) range of the random resized crop."""
    max_duration: float = 15.0
    """Seconds of each clip kept (from the start)."""
    max_text_tokens: int = 70
    """Caption tokens kept before the eos."""
    text_mask_ratio: float = 0.15
    """Text-only view: fraction of words masked (whole words)."""
    vl_text_mask_ratio: float = 0.4
    """Joint image-text view: fraction of tokens masked."""
    image_mask_ratio: float = 0.75
    """Image-only view: fraction of patches masked."""
    vl_image_mask_ratio: float = 0.6875
    """Joint image-text view: fraction of patches masked (complementary to the image-only view)."""
    audio_mask_ratio: float = 0.55
    """Audio-only view: fraction of frames masked (spans)."""
    al_audio_mask_ratio: float = 0.45
    """Joint audio-text view: fraction of frames masked (spans, drawn independently)."""
    al_text_mask_ratio: float = 0.4
    """Joint audio-text view: fraction of words masked (whole words)."""
    audio_span: int = 5
    """Frames per masked span."""
    audio_mask_prob_adjust: float = 0.1
    """Added to the audio ratios when drawing span centres."""
    max_substitutes: int = 64
    """Records tried after a bad one before the loader reports the data as unusable."""
    max_per_text: int | None = None
    """TSV only: use at most this many records of each distinct caption per epoch, a fresh random choice every
    epoch (``None``: every record). Captions repeated hundreds of times (class names such as spoken digits) fill
    batches with identical texts, and a contrastive loss is then lowest when the other side's embeddings
    collapse to one point."""

    def __post_init__(self) -> None:
        for name in ("paths", "crop_scale", "crop_ratio"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        self._validate()

    def _validate(self) -> None:
        if self.format not in ("tsv", "webdataset"):
            raise ValueError(f"format must be 'tsv' or 'webdataset', got {self.format!r}")
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 (image-text) or 2 (audio-text), got {self.stage!r}")
        for name in ("batch_size", "prefetch_factor", "max_text_tokens", "audio_span", "max_substitutes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_per_text is not None and (self.max_per_text < 1 or self.format != "tsv"):
            raise ValueError(f"max_per_text must be None or >= 1 with format 'tsv', got {self.max_per_text!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.image_size < PATCH_SIZE or self.image_size % PATCH_SIZE:
            raise ValueError(f"image_size must be a positive multiple of {PATCH_SIZE}, got {self.image_size}")
        lo, hi = self.crop_scale
        if len(self.crop_scale) != 2 or not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {self.crop_scale}")
        if len(self.crop_ratio) != 2 or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must be (low, high) with 0 < low <= high, got {self.crop_ratio}")
        for name in [f.name for f in dataclasses.fields(self) if f.name.endswith("mask_ratio")]:
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        n = self.num_patches
        if n - math.floor(round(self.image_mask_ratio * n, 9)) > math.floor(round(self.vl_image_mask_ratio * n, 9)):
            raise ValueError("vl_image_mask_ratio must mask at least the patches the image-only view leaves visible")
        audio = self.audio_config
        frames = audio.num_frames(int(self.max_duration * audio.sample_rate))
        if self.max_duration < 1 or frames + 1 > audio.max_rel_positions:
            raise ValueError(f"max_duration must give 1 s .. {audio.max_rel_positions - 1} frames, got {frames}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PretrainDataConfig:
        """Build from a mapping (e.g. a YAML section); unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown data config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**dict(values))

    @property
    def views(self) -> tuple[str, ...]:
        return VIEWS_STAGE1 if self.stage == 1 else VIEWS_STAGE2

    @property
    def num_patches(self) -> int:
        return (self.image_size // PATCH_SIZE) ** 2

    @property
    def audio_config(self) -> AudioAdapterConfig:
        return AudioAdapterConfig(max_duration=self.max_duration)


@dataclass(frozen=True)
class LoadedBatch(PretrainBatch):
    """A :class:`PretrainBatch` from the loader, with bookkeeping.

    Attributes:
        keys: record id of each row (duplicates repeat an id).
        skipped: bad records replaced in this batch, counted by reason (``empty_text``, ``missing_file``,
            ``bad_image``, ``bad_audio``, ``bad_row``, ``missing_media``, ``missing_text``, ``bad_shard``).
    """

    keys: tuple[str, ...] = ()
    skipped: dict[str, int] = field(default_factory=dict)


class PretrainCollator:
    """Collate :class:`Example` s into a :class:`LoadedBatch` with the stage's views."""

    def __init__(self, config: PretrainDataConfig) -> None:
        self.views, self.audio = config.views, config.audio_config

    def __call__(self, examples: Sequence[Example]) -> LoadedBatch:
        """Text ``[B, n]`` padded with 1; image ``[B, 3, S, S]`` or audio via :func:`collate_audio`; view masks
        padded with False to the text width ``n + 1``, ``N + 1`` patches or the audio padding-mask width."""
        n = max(e.tokens.size for e in examples)
        text = torch.full((len(examples), n), PAD_ID, dtype=torch.long)
        for i, e in enumerate(examples):
            text[i, : e.tokens.size] = torch.from_numpy(e.tokens)
        image = waveform = padding = None
        widths = {"text": n + 1, "vl_text": n + 1, "al_text": n + 1}
        if examples[0].image is not None:
            image = torch.stack([e.image for e in examples])
        if examples[0].waveform is not None:
            waveform, padding = collate_audio([e.waveform for e in examples], self.audio)
            widths.update(audio=padding.shape[1], al_audio=padding.shape[1])
        views = {v: collate_view([e.masks[v] for e in examples], widths.get(v)) for v in self.views}
        skipped: dict[str, int] = {}
        for e in examples:
            for reason, count in e.skipped.items():
                skipped[reason] = skipped.get(reason, 0) + count
        return LoadedBatch(
            text=text,
            image=image,
            audio_waveform=waveform,
            audio_padding_mask=padding,
            views=views,
            num_samples=sum(not e.duplicate for e in examples),
            keys=tuple(e.key for e in examples),
            skipped=skipped,
        )


def build_pretrain_loader(
    config: PretrainDataConfig,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    skip_batches: int = 0,
    device: torch.device | str | None = None,
) -> DataLoader:
    """Loader of one rank's batches (:class:`LoadedBatch`) for one epoch.

    Every rank gets the same number of full batches of ``config.batch_size`` (repeats are flagged: they are not
    counted in ``num_samples``). The order is fixed by ``seed + epoch`` and the examples by
    ``(seed, epoch, slot)``. ``skip_batches`` starts after that many batches of this rank's epoch; for an exact
    resume keep ``world_size`` (and, for shards, ``num_workers``) unchanged. Batches are pinned when they feed a
    CUDA ``device`` (see :func:`onepeace.data.batch.pin_memory_for`).
    """
    if not config.paths:
        raise ValueError("PretrainDataConfig.paths is empty: give the TSV files or shards to read")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got {seed} and {epoch}")
    maker, workers = ExampleMaker(config), config.num_workers
    _ = maker.tokenizer  # built once here: forked workers inherit it
    # The loader's own generator: starting an iterator must not draw from the global RNG (exact resume).
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    options: dict[str, Any] = {"num_workers": workers, "collate_fn": PretrainCollator(config), "generator": generator}
    options["pin_memory"] = pin_memory_for(device)
    if workers > 0:
        options["prefetch_factor"] = config.prefetch_factor
    if config.format == "tsv":
        index = TsvIndex(config.paths, TSV_COLUMNS[config.stage], config.root)
        groups = index.text_groups() if config.max_per_text is not None else None
        sampler = EpochBatchSampler(
            len(index), config.batch_size, rank, world_size, seed, epoch, skip_batches, groups, config.max_per_text
        )
        dataset = TsvPretrainDataset(index, maker, seed, epoch, config.max_substitutes)
        return DataLoader(dataset, batch_sampler=sampler, **options)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    shards = expand_shards(config.paths)
    counts = shard_counts(shards, rank)  # from the shards' manifest (written once), see data.shard_manifest
    plans = plan_shards(shards, counts, world_size, max(1, workers), config.batch_size, seed, epoch)
    dataset = ShardPretrainDataset(
        plans[rank],
        maker,
        config.batch_size,
        rank,
        seed,
        epoch,
        SHARD_MEDIA_KEYS[config.stage],
        SHARD_TEXT_KEY,
        skip_batches,
        config.max_substitutes,
    )
    return DataLoader(dataset, batch_size=config.batch_size, **options)
