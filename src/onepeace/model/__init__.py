"""The ONE-PEACE architecture in plain PyTorch (one device, no I/O)."""

from onepeace.model.onepeace import AudioInput, OnePeaceModel
from onepeace.model.outputs import AdapterOutput, Embeddings, Features, SegmentOutput

__all__ = ["AdapterOutput", "AudioInput", "Embeddings", "Features", "OnePeaceModel", "SegmentOutput"]
