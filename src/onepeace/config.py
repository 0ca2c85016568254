"""Typed model configuration. Named variants live in :mod:`onepeace.variants`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from onepeace.modality import Modality
from onepeace.strict_config import bounded, check_bounds


@dataclass(frozen=True)
class TextAdapterConfig:
    """Language adapter (spec §2.3)."""

    vocab_size: int = bounded(50264, 2, 1_000_000)
    """Rows of the token table (GPT-2 BPE through the fairseq dictionary)."""
    pad_id: int = bounded(1, 0, 999_999)
    """Padding token id; its embedding row is zero."""
    max_positions: int = bounded(514, 3, 65536)
    """Rows of the absolute position table (position 0 is the cls slot)."""
    bucket_size: int = bounded(256, 1, 65536)
    """1-D relative-position buckets; the table has ``2 * bucket_size + 2`` rows."""
    max_rel_positions: int = bounded(1024, 1, 4096)
    """Positions covered by the precomputed relative-position index (an ``[n, n]`` int64 table)."""

    def __post_init__(self) -> None:
        check_bounds(type(self), vars(self))
        if self.pad_id >= self.vocab_size:
            raise ValueError(f"pad_id {self.pad_id} is not below vocab_size {self.vocab_size}")


@dataclass(frozen=True)
class ImageAdapterConfig:
    """Vision adapter (spec §2.1)."""

    image_size: int = bounded(256, 16, 1024, multiple_of=16)
    """Side of the square input image in pixels; the patch grid side is ``image_size // 16``."""
    pos_grid: int = bounded(16, 1, 256)
    """Side of the stored absolute-position grid (resized bicubically when the image grid differs)."""

    def __post_init__(self) -> None:
        check_bounds(type(self), vars(self))

    @property
    def patch_size(self) -> int:
        return 16

    @property
    def grid(self) -> int:
        """Side of the patch grid, which is also the side of the 2-D relative-position grid."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class AudioAdapterConfig:
    """Audio adapter (spec §2.2)."""

    feature_layers: tuple[tuple[int, int, int], ...] = bounded(
        ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2,
        length=(1, 32),
        items=((1, 16384), (1, 4096), (1, 4096)),
    )
    """Conv feature extractor blocks as (channels, kernel, stride)."""
    conv_pos_depth: int = bounded(5, 1, 64)
    """Blocks of the convolutional positional embedding."""
    conv_pos_width: int = bounded(95, 1, 4096)
    """Total receptive width; each block's kernel is ``max(3, width // depth)``."""
    conv_pos_groups: int = bounded(16, 1, 4096)
    """Groups of each positional convolution."""
    bucket_size: int = bounded(512, 1, 65536)
    """1-D relative-position buckets; the table has ``2 * bucket_size + 2`` rows."""
    max_rel_positions: int = bounded(1024, 1, 4096)
    """Positions covered by the precomputed relative-position index (cls + frames; an ``[n, n]`` int64 table)."""
    sample_rate: int = bounded(16000, 1000, 384000)
    """Expected waveform sample rate."""
    max_duration: float = bounded(15.0, 0.01, 3600)
    """Seconds of audio kept by preprocessing (the rest is cut)."""
    batch_invariant: bool = True
    """Zero the padded frames before each convolutional-position block, so that a clip's embedding does not depend on
    the other clips of its batch (it equals the clip run alone). False reproduces the official code, where the zero
    padding of a batch reaches the last real frames through the positional convolutions."""

    def __post_init__(self) -> None:
        check_bounds(type(self), vars(self))

    @property
    def conv_pos_kernel(self) -> int:
        return max(3, self.conv_pos_width // self.conv_pos_depth)

    def num_frames(self, num_samples: int) -> int:
        """Frames the feature extractor produces for ``num_samples`` samples (no padding)."""
        length = num_samples
        for _, kernel, stride in self.feature_layers:
            length = (length - kernel) // stride + 1
        return max(length, 0)


@dataclass(frozen=True)
class OnePeaceConfig:
    """The whole model: adapters, fusion encoder and embedding heads (spec §1-4)."""

    embed_dim: int = bounded(1536, 1, 16384)
    """Width D of the fusion encoder."""
    layers: int = bounded(40, 1, 512)
    """Fusion layers."""
    heads: int = bounded(24, 1, 1024)
    """Attention heads (head dim = embed_dim / heads)."""
    ffn_dim: int = bounded(6144, 1, 65536)
    """Inner width of each GeGLU FFN."""
    layer_scale_init: float = bounded(1e-6, 0, 100)
    """Initial LayerScale value (0 disables LayerScale)."""
    drop_path_rate: float = bounded(0.0, 0, 1)
    """Stochastic depth at the last layer, linearly increasing from 0 at the first."""
    per_layer_rel_pos: bool = False
    """One relative-position table per layer (fine-tuning) instead of one shared table per modality."""
    modalities: tuple[Modality, ...] = (Modality.TEXT, Modality.IMAGE, Modality.AUDIO)
    """Branches that are built."""
    text: TextAdapterConfig = field(default_factory=TextAdapterConfig)
    image: ImageAdapterConfig = field(default_factory=ImageAdapterConfig)
    audio: AudioAdapterConfig = field(default_factory=AudioAdapterConfig)
    max_text_tokens: int = bounded(70, 1, 65536)
    """BPE tokens kept by the tokenizer before the eos token."""
    logit_scale_init: float = bounded(2.6592600369262695, -100, 100)
    """Initial contrastive logit scale, ln(1/0.07)."""

    def __post_init__(self) -> None:
        check_bounds(type(self), vars(self))
        if self.embed_dim % self.heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by heads {self.heads}")
        mods = tuple(Modality.parse(m) for m in self.modalities)
        if not mods:
            raise ValueError("a model needs at least one modality")
        if Modality.AUDIO in mods and self.embed_dim % self.audio.conv_pos_groups:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by audio.conv_pos_groups {self.audio.conv_pos_groups}"
            )
        object.__setattr__(self, "modalities", mods)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.heads

    @property
    def num_rel_pos_tables(self) -> int:
        return self.layers if self.per_layer_rel_pos else 1

    def replace(self, **changes: Any) -> OnePeaceConfig:
        """Return a copy with top-level fields changed (``image_size`` changes the image adapter)."""
        if "image_size" in changes:
            size = int(changes.pop("image_size"))
            if size <= 0 or size % 16:
                raise ValueError(f"image_size must be a positive multiple of 16, got {size}")
            changes["image"] = dataclasses.replace(self.image, image_size=size)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (inverse of :meth:`from_dict`)."""
        out = dataclasses.asdict(self)
        out["modalities"] = [m.value for m in self.modalities]
        out["audio"]["feature_layers"] = [list(t) for t in self.audio.feature_layers]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OnePeaceConfig:
        """Build from :meth:`to_dict` output, strictly (:func:`onepeace.strict_config.build_section`): unknown keys
        and values of the wrong type raise ``ValueError`` naming the dotted key."""
        from onepeace.strict_config import build_section

        return build_section(cls, data, "config")
