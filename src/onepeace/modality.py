"""The three modalities ONE-PEACE understands."""

from __future__ import annotations

from enum import Enum


class Modality(str, Enum):
    """A modality. The string value is the key used in modality-keyed ``ModuleDict``s."""

    TEXT = "text"
    IMAGE = "image"
    AUDIO = "audio"

    @classmethod
    def parse(cls, value: Modality | str) -> Modality:
        """Turn ``"image"`` (or a ``Modality``) into a ``Modality``; raise ``ValueError`` naming the choices."""
        if isinstance(value, Modality):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown modality {value!r}; expected one of: {choices}") from None


#: Order of the segments in a joint sequence: text always comes first (official behaviour).
SEGMENT_ORDER: tuple[Modality, ...] = (Modality.TEXT, Modality.IMAGE, Modality.AUDIO)


def ordered(modalities: set[Modality] | list[Modality] | tuple[Modality, ...]) -> list[Modality]:
    """Sort modalities into joint-sequence order (text, image, audio)."""
    present = set(modalities)
    return [m for m in SEGMENT_ORDER if m in present]
