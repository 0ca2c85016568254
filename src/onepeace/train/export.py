"""Pretraining checkpoint -> the native model directory :func:`onepeace.load` reads.

Used at the end of a run and by ``onepeace checkpoint export``. Stage 2 started from a stage-1 run gets that run's
image branch back, so the model has all three modalities. Either checkpoint layout of
:mod:`onepeace.train.checkpoint` works (a sharded one is read in this one process); no optimizer state is loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from onepeace.errors import CheckpointError
from onepeace.modality import Modality


def export_pretrain_backbone(cfg, objective_state: dict[str, torch.Tensor], out: str | Path) -> Path:
    """Write the backbone of a pretraining module's full state dict (``model.*`` keys) as a native model dir.

    ``cfg`` is the run's :class:`~onepeace.train.config.TrainConfig`.
    """
    from onepeace.train.checkpoint import export_inference_weights

    backbone = {k.removeprefix("model."): v for k, v in objective_state.items() if k.startswith("model.")}
    if not backbone:
        raise CheckpointError("the training state has no backbone (model.*) tensors")
    model_cfg = cfg.model.backbone_config(cfg.stage)
    if cfg.stage == 2 and cfg.model.init_from:
        from onepeace.train.build import image_branch, read_start_weights

        image = image_branch(read_start_weights(cfg.model.init_from))
        if image:
            backbone.update(image)
            model_cfg = model_cfg.replace(modalities=(Modality.TEXT, Modality.IMAGE, Modality.AUDIO))
    return export_inference_weights(backbone, model_cfg, out)


def export_pretrain_checkpoint(step_dir: str | Path, out: str | Path) -> Path:
    """The backbone of a complete pretraining step directory (either layout) as a native model directory."""
    from onepeace.data.pretrain import PretrainDataConfig
    from onepeace.train.checkpoint import CONFIG, read_checkpoint_weights
    from onepeace.train.config import parse_recipe

    recipe = Path(step_dir) / CONFIG
    cfg = parse_recipe(recipe.read_text(), data_config_type=PretrainDataConfig, source=str(recipe))
    return export_pretrain_backbone(cfg, read_checkpoint_weights(step_dir, "model."), out)
