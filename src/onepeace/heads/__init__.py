"""Task heads that sit on the backbone's token features (spec §8)."""

from onepeace.heads.classify import AttentionPool, ClassifyHead, MeanPoolHead

__all__ = ["AttentionPool", "ClassifyHead", "MeanPoolHead"]
