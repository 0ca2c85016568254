"""Pretraining losses on tensors (they never call the model): contrastive (§5.2) and denoising (§5.3)."""

from onepeace.losses.contrastive import ContrastiveLoss, Gather, contrastive_loss
from onepeace.losses.denoising import denoising_loss
from onepeace.losses.named import NamedLosses

__all__ = ["ContrastiveLoss", "Gather", "NamedLosses", "contrastive_loss", "denoising_loss"]
