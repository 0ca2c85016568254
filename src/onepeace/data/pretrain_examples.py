"""Per-example pretraining transforms and masks (spec §5.4, §6.2, §6.3).

:class:`ExampleMaker` decodes a :class:`~onepeace.data.pretrain_sources.Record` (caption normalised and encoded,
image fully decoded, or clip loaded at 16 kHz and prepared as in the API) and builds an :class:`Example`: a
random resized crop with CLIP normalisation (stage 1) and the masks of the stage's denoising views, every random
draw taken from the generator it is given.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from onepeace.data.audio import load_audio, prepare_waveform
from onepeace.data.image import CLIP_MEAN, CLIP_STD, load_image
from onepeace.data.masking import (
    complementary_patch_mask,
    joint_text_mask,
    random_patch_mask,
    span_mask,
    whole_word_mask,
    with_cls,
)
from onepeace.data.pretrain_sources import BadRecord, Record
from onepeace.data.tokenizer import Tokenizer, tokenizer_for
from onepeace.errors import MissingDependencyError

if TYPE_CHECKING:
    from onepeace.data.pretrain import PretrainDataConfig


def sample_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """Random-resized-crop box ``(left, top, crop_width, crop_height)`` of a ``width x height`` image.

    Up to 10 tries draw an area fraction uniformly from ``scale`` and an aspect ratio log-uniformly from
    ``ratio``; the first box that fits is placed uniformly at random. Otherwise the centred crop of the whole
    image clamped to the ratio range is used.
    """
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(
    img: Image.Image, size: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> torch.Tensor:
    """Training image transform: crop (:func:`sample_crop_box`), bicubic resize to ``size x size``, /255, CLIP
    normalisation -> ``float32 [3, size, size]``."""
    left, top, w, h = sample_crop_box(img.width, img.height, scale, ratio, rng)
    crop = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return (pixels - mean) / std


@dataclass
class Decoded:
    """A usable record: token ids ``[n]`` (eos last), their word starts ``[n]``, and the media (an RGB PIL image
    or a prepared waveform ``float32 [N]``)."""

    key: str
    tokens: np.ndarray
    word_starts: np.ndarray
    media: Image.Image | np.ndarray


@dataclass
class Example:
    """One model-ready example; ``masks`` maps view names to bool masks over the cls-prefixed sequence."""

    key: str
    tokens: np.ndarray
    image: torch.Tensor | None
    waveform: np.ndarray | None
    masks: dict[str, np.ndarray]
    duplicate: bool = False
    skipped: dict[str, int] = field(default_factory=dict)


class ExampleMaker:
    """Decodes records and builds examples for one :class:`PretrainDataConfig` (picklable, tokenizer per process)."""

    def __init__(self, config: PretrainDataConfig) -> None:
        self.config, self.audio = config, config.audio_config
        self._tokenizer: Tokenizer | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizer": None}

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            n = self.config.max_text_tokens
            self._tokenizer = tokenizer_for(n)
        return self._tokenizer

    def decode(self, record: Record) -> Decoded:
        """Tokens and media of ``record``; raises :class:`BadRecord` (``empty_text``, ``missing_file``,
        ``bad_image`` or ``bad_audio``)."""
        text = Tokenizer.normalize(record.text)
        tokens = np.asarray(self.tokenizer.encode(text), dtype=np.int64) if text else np.zeros(0, dtype=np.int64)
        starts = np.asarray(self.tokenizer.is_word_start(tokens), dtype=bool)
        if not starts[:-1].any():
            raise BadRecord("empty_text", f"record {record.key!r} has no word after normalisation")
        if isinstance(record.media, str) and not os.path.isfile(record.media):
            raise BadRecord("missing_file", f"record {record.key!r}: {record.media!r} not found")
        try:
            if self.config.stage == 1:
                media = load_image(record.media, name=f"record {record.key!r}")
            else:
                wave = load_audio(record.media, target_rate=self.audio.sample_rate, name=f"record {record.key!r}")
                media = prepare_waveform(wave, self.audio, name=f"record {record.key!r}")
        except MissingDependencyError:
            raise
        except Exception as exc:  # any decoder failure makes the record unusable, never the loader
            raise BadRecord("bad_image" if self.config.stage == 1 else "bad_audio", str(exc)) from exc
        return Decoded(record.key, tokens, starts, media)

    def build(self, decoded: Decoded, rng: np.random.Generator, duplicate: bool, skipped: dict[str, int]) -> Example:
        """Transform the media and draw the masks of the stage's views (in :attr:`PretrainDataConfig.views` order)."""
        c, n = self.config, decoded.tokens.size
        if c.stage == 1:
            image = random_resized_crop(decoded.media, c.image_size, c.crop_scale, c.crop_ratio, rng)
            text = whole_word_mask(decoded.word_starts, c.text_mask_ratio, rng)
            patches = random_patch_mask(c.num_patches, c.image_mask_ratio, rng)
            masks = {
                "text": text,
                "image": patches,
                "vl_text": joint_text_mask(n, c.vl_text_mask_ratio, text, rng),
                "vl_image": complementary_patch_mask(patches, c.vl_image_mask_ratio, rng),
            }
            waveform = None
        else:
            image, waveform = None, decoded.media
            frames = self.audio.num_frames(waveform.shape[0])
            span = {"span": c.audio_span, "prob_adjust": c.audio_mask_prob_adjust}
            masks = {
                "audio": span_mask(frames, c.audio_mask_ratio, rng, **span),
                "al_text": whole_word_mask(decoded.word_starts, c.al_text_mask_ratio, rng),
                "al_audio": span_mask(frames, c.al_audio_mask_ratio, rng, **span),
            }
        masks = {name: with_cls(mask) for name, mask in masks.items()}
        return Example(decoded.key, decoded.tokens, image, waveform, masks, duplicate, dict(skipped))
