"""Checkpoint reading (official fairseq ``.pt`` and ``.safetensors``) and position-table resampling."""

from onepeace.checkpoints.pickle_io import load_state_dict_file, read_official_checkpoint
from onepeace.checkpoints.resample import (
    geometric_offsets,
    image_rel_pos_index,
    resample_rel_pos_table_2d,
    resize_abs_pos_2d,
    text_audio_rel_pos_index,
)

__all__ = [
    "geometric_offsets",
    "image_rel_pos_index",
    "load_state_dict_file",
    "read_official_checkpoint",
    "resample_rel_pos_table_2d",
    "resize_abs_pos_2d",
    "text_audio_rel_pos_index",
]
