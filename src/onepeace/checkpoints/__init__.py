"""Checkpoint reading (official fairseq ``.pt``, native safetensors directories) and table resampling.

Submodules are imported on use; this package runs nothing at import time.
"""
