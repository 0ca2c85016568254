"""Named model variants: a plain dict from name to :class:`OnePeaceConfig`."""

from __future__ import annotations

from onepeace.config import AudioAdapterConfig, ImageAdapterConfig, OnePeaceConfig

_TINY_AUDIO = ((32, 10, 5),) + ((32, 3, 2),) * 4 + ((32, 2, 2),) * 2
_SMALL_AUDIO = ((64, 10, 5),) + ((64, 3, 2),) * 4 + ((64, 2, 2),) * 2

VARIANTS: dict[str, OnePeaceConfig] = {
    # Released ONE-PEACE ("4B": 3,884,740,545 parameters), spec §1.
    "onepeace-4b": OnePeaceConfig(),
    # The ViT-B/16-size model of the paper's ablations.
    "onepeace-base": OnePeaceConfig(embed_dim=768, layers=12, heads=12, ffn_dim=3072),
    # The default model shipped with the package, sized for CPU (docs/model_card_small.md).
    "onepeace-small": OnePeaceConfig(
        embed_dim=256,
        layers=6,
        heads=4,
        ffn_dim=512,
        image=ImageAdapterConfig(image_size=96, pos_grid=6),
        audio=AudioAdapterConfig(feature_layers=_SMALL_AUDIO, max_duration=4.0),
    ),
    # The official tiny test configuration (../fixtures/official_tiny): every switch of the 4B model, tiny sizes.
    "onepeace-tiny": OnePeaceConfig(
        embed_dim=64,
        layers=2,
        heads=4,
        ffn_dim=256,
        image=ImageAdapterConfig(image_size=64, pos_grid=4),
        audio=AudioAdapterConfig(feature_layers=_TINY_AUDIO),
    ),
}


def list_variants() -> list[str]:
    """Names accepted by :func:`onepeace.load`."""
    return sorted(VARIANTS)


def get_variant(name: str) -> OnePeaceConfig:
    """Config of a named variant; ``KeyError`` lists the known names."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise KeyError(f"unknown variant {name!r}; known variants: {', '.join(list_variants())}") from None
