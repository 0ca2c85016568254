"""Embeddings from an ONNX export folder with onnxruntime and numpy preprocessing; torch is never imported.

The preprocessing is the one :func:`onepeace.load` models use (:mod:`onepeace.data`), in its numpy form: the same
tokenizer, PIL bicubic resize with CLIP normalisation, and soundfile + soxr audio; the audio standardisation runs
in numpy (within ~1e-6 of the torch layer norm).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onepeace.data import as_list as _as_list
from onepeace.data import batched
from onepeace.data.long_audio import check_long_audio
from onepeace.errors import InputError, require
from onepeace.modality import Modality
from onepeace.onnx.manifest import INPUTS, Manifest, read_manifest


@dataclass(frozen=True)
class OnnxEmbeddings:
    """L2-normalised float32 embeddings ``[B, D]`` per modality (None for modalities not asked for)."""

    text: np.ndarray | None = None
    image: np.ndarray | None = None
    audio: np.ndarray | None = None


class OnnxModel:
    """The encoders of an export folder (``onepeace export onnx MODEL DIR``) as onnxruntime sessions.

    Args:
        directory: the export folder.
        threads: onnxruntime intra-op threads (default: onnxruntime's choice, all cores).
        variant: ``""`` for the fp32 graphs, ``"int8"`` for the dynamically quantised copies (``--int8`` export).
        providers: onnxruntime execution providers (default CPU).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        threads: int | None = None,
        variant: str = "",
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        self.ort = require("onnxruntime", "onnx")
        self.directory = Path(directory)
        self.manifest: Manifest = read_manifest(self.directory)
        self.config = self.manifest.model_config
        options = self.ort.SessionOptions()
        options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise InputError(f"threads must be a positive int, got {threads!r}")
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self._options, self._providers, self._variant = options, list(providers), variant
        self._sessions: dict[Modality, Any] = {}

    @property
    def modalities(self) -> tuple[Modality, ...]:
        return self.manifest.modalities

    @property
    def embed_dim(self) -> int:
        return self.manifest.embed_dim

    def session(self, modality: Modality | str) -> Any:
        """The onnxruntime session of one modality, created on first use."""
        modality = Modality.parse(modality)
        if modality not in self.modalities:
            have = ", ".join(m.value for m in self.modalities)
            raise InputError(f"this export has no {modality.value} encoder (it has: {have})")
        if modality not in self._sessions:
            path = self.directory / self.manifest.graphs[modality.value]["file"]
            if self._variant:
                path = path.with_suffix(f".{self._variant}.onnx")
            if not path.is_file():
                raise InputError(f"{path}: graph file is missing; re-export the folder")
            self._sessions[modality] = self.ort.InferenceSession(str(path), self._options, providers=self._providers)
        return self._sessions[modality]

    # ----------------------------------------------------------------------------------------- model-ready inputs
    def encode(self, modality: Modality | str, **inputs: np.ndarray) -> np.ndarray:
        """Run one encoder on model-ready arrays; returns float32 ``[B, D]``.

        text: ``tokens`` int64 ``[B, n]``; image: ``pixels`` float32 ``[B, 3, S, S]``; audio: ``waveform`` float32
        ``[B, N]`` and ``padding_mask`` bool ``[B, T + 1]`` (what :meth:`tokenize` / :meth:`preprocess_image` /
        :meth:`preprocess_audio` return).
        """
        modality = Modality.parse(modality)
        names = INPUTS[modality]
        if set(inputs) != set(names):
            raise InputError(f"{modality.value} takes {', '.join(names)}; got {', '.join(sorted(inputs)) or 'nothing'}")
        dtypes = {"tokens": np.int64, "pixels": np.float32, "waveform": np.float32, "padding_mask": np.bool_}
        feed = {name: np.ascontiguousarray(inputs[name], dtype=dtypes[name]) for name in names}
        return self.session(modality).run(None, feed)[0]

    # ----------------------------------------------------------------------------------------- preprocessing
    def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
        """Token ids int64 ``[B, n]`` as ``OnePeace.tokenize`` makes them."""
        from onepeace.data.tokenizer import tokenizer_for

        return tokenizer_for(self.manifest.max_text_tokens).encode_batch(texts)

    def preprocess_image(self, images: Sequence[Any]) -> np.ndarray:
        """Paths, bytes, PIL images or arrays -> float32 ``[B, 3, S, S]`` (bicubic resize, CLIP normalisation)."""
        from onepeace.data.image import image_arrays

        return image_arrays(_as_list(images), self.manifest.image_size)

    def preprocess_audio(self, clips: Sequence[Any], sample_rate: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Paths, bytes or arrays -> ``(waveform [B, N], padding_mask [B, T + 1])``, resampled and standardised."""
        from onepeace.data.audio import audio_arrays

        return audio_arrays(_as_list(clips), self.config.audio, sample_rate, torch_free=True)

    # ----------------------------------------------------------------------------------------- raw data in
    def embed(
        self,
        text: str | Sequence[str] | None = None,
        image: Any | Sequence[Any] | None = None,
        audio: Any | Sequence[Any] | None = None,
        *,
        sample_rate: float | None = None,
        batch_size: int = 32,
        long_audio: str = "first",
    ) -> OnnxEmbeddings:
        """Normalised embeddings ``[B, D]`` of raw inputs, ``batch_size`` items per run (like ``OnePeace.embed``).

        ``long_audio``: ``"first"`` (official) embeds the first ``max_duration`` seconds of a clip; ``"windows"``
        embeds every part of a longer clip in windows of that length and pools them (the mean of the normalised
        window embeddings, re-normalised), as ``OnePeace.embed(long_audio="windows")`` does.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
        check_long_audio(long_audio)
        out: dict[str, np.ndarray] = {}
        if text is not None:
            texts = _as_list(text)
            for i, t in enumerate(texts):
                if isinstance(t, str) and not t.strip():
                    raise InputError(f"text {i} is empty; give some words to embed")
            out["text"] = _batched(texts, batch_size, lambda b: self.encode("text", tokens=self.tokenize(b)))
        if image is not None:
            encode_images = lambda b: self.encode("image", pixels=self.preprocess_image(b))  # noqa: E731
            out["image"] = _batched(_as_list(image), batch_size, encode_images)
        if audio is not None:
            if long_audio == "windows":
                encode_audio = lambda b: self._pooled_windows(b, sample_rate, batch_size)  # noqa: E731
            else:
                encode_audio = lambda b: self._encode_waves(self.preprocess_audio(b, sample_rate))  # noqa: E731
            out["audio"] = _batched(_as_list(audio), batch_size, encode_audio)
        if not out:
            raise InputError("give at least one of text=, image= or audio=")
        return OnnxEmbeddings(**out)

    def _encode_waves(self, batch: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        return self.encode("audio", **dict(zip(INPUTS[Modality.AUDIO], batch)))

    def _pooled_windows(self, clips: list[Any], sample_rate: float | None, batch_size: int) -> np.ndarray:
        """``[len(clips), D]``: each clip's windows embedded ``batch_size`` at a time, mean-pooled, re-normalised."""
        from onepeace.data.audio import collate_arrays
        from onepeace.data.long_audio import clip_windows

        cfg = self.config.audio
        windows, owner = clip_windows(clips, cfg, sample_rate, torch_free=True)
        emb = _batched(windows, batch_size, lambda b: self._encode_waves(collate_arrays(b, cfg)))
        pooled = np.zeros((len(clips), emb.shape[1]), dtype=np.float32)
        np.add.at(pooled, np.asarray(owner), emb)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def _batched(items: list[Any], size: int, encode: Callable[[list[Any]], np.ndarray]) -> np.ndarray:
    """``encode`` over consecutive chunks of ``items``, concatenated: ``[len(items), D]``."""
    return batched(items, size, encode, np.concatenate)
