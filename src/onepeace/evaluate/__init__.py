"""Evaluation of embeddings: retrieval metrics, the held-out corpus protocol, reports and plots.

Submodules are imported on use; importing this package loads nothing heavy.
"""
