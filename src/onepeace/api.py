"""The user-facing model: preprocessing of raw inputs plus the network (``onepeace.load`` returns this)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from onepeace.config import OnePeaceConfig
from onepeace.data import as_list as _as_list
from onepeace.data import batched
from onepeace.data.long_audio import check_long_audio
from onepeace.errors import InputError
from onepeace.modality import Modality
from onepeace.model import Embeddings, Features, OnePeaceModel


class OnePeace(nn.Module):
    """ONE-PEACE with its official preprocessing.

    ``tokenize`` / ``preprocess_image`` / ``preprocess_audio`` turn raw inputs into tensors; ``encode_*`` give
    L2-normalised ``[B, D]`` embeddings; ``embed`` does both; ``forward_features`` exposes hidden states.
    """

    def __init__(self, model: OnePeaceModel, long_audio: str = "first") -> None:
        super().__init__()
        self.model = model
        self.long_audio = check_long_audio(long_audio)
        """Default of :meth:`embed`'s ``long_audio`` (``"first"`` or ``"windows"``)."""

    @property
    def cfg(self) -> OnePeaceConfig:
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.logit_scale.dtype

    @property
    def image_size(self) -> int:
        return self.cfg.image.image_size

    @property
    def modalities(self) -> tuple[Modality, ...]:
        """The modalities this model embeds (a stage-1 model has text and image only)."""
        return self.model.modalities

    # ----------------------------------------------------------------------------------------- preprocessing
    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Official API token ids ``LongTensor [B, n]``: lowercased, BPE, <= 70 ids + eos, right-padded with 1."""
        from onepeace.data.tokenizer import default_tokenizer

        return default_tokenizer()(texts)

    def preprocess_image(self, images: Sequence[Any]) -> torch.Tensor:
        """Paths, bytes, PIL images or arrays -> ``FloatTensor [B, 3, S, S]`` (bicubic resize, CLIP normalisation)."""
        from onepeace.data.image import preprocess_images

        return preprocess_images(_as_list(images), self.image_size)

    def preprocess_audio(
        self, clips: Sequence[Any], sample_rate: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Paths, bytes or arrays -> ``(waveform [B, N], padding_mask [B, T + 1])`` at 16 kHz, standardised."""
        from onepeace.data.audio import preprocess_audio

        return preprocess_audio(_as_list(clips), self.cfg.audio, sample_rate=sample_rate)

    # ----------------------------------------------------------------------------------------- tensors in
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, n]`` -> L2-normalised ``[B, D]``."""
        return self.model.encode_text(self._to_device(tokens))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels [B, 3, S, S]`` -> L2-normalised ``[B, D]``."""
        return self.model.encode_image(self._to_device(pixels))

    def encode_audio(self, waveform: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """``waveform [B, N]``, ``padding_mask [B, T + 1]`` -> L2-normalised ``[B, D]``."""
        return self.model.encode_audio(self._to_device(waveform), self._to_device(padding_mask))

    def forward_features(
        self,
        text: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        audio: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Features:
        """One pass over the modalities given (text+image or text+audio run jointly).

        Returns Features whose ``.text`` / ``.image`` / ``.audio`` have ``.hidden [B, S, D]`` (after the final
        norm) and ``.padding_mask [B, S]``.
        """
        text, image, audio = self._move(text, image, audio)
        return self.model.forward_features(text, image, audio)

    def forward_intermediates(
        self,
        text: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        audio: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Residual stream after every layer: L tensors ``[B, S_total, D]`` before the final norms."""
        text, image, audio = self._move(text, image, audio)
        return self.model.forward_intermediates(text, image, audio)

    def forward(self, **inputs: Any) -> Embeddings:
        return self.embed(**inputs)

    # ----------------------------------------------------------------------------------------- raw data in
    @torch.inference_mode()
    def embed(
        self,
        text: str | Sequence[str] | None = None,
        image: Any | Sequence[Any] | None = None,
        audio: Any | Sequence[Any] | None = None,
        *,
        sample_rate: int | None = None,
        batch_size: int = 32,
        long_audio: str | None = None,
    ) -> Embeddings:
        """Normalised embeddings ``[B, D]`` of raw inputs, computed ``batch_size`` items at a time.

        ``text``: strings; ``image``: paths, bytes, PIL images or arrays; ``audio``: paths, bytes or 1-D arrays
        (at ``sample_rate``, default 16 kHz). Each modality runs its own unimodal pass. An item's embedding does not
        depend on the other items of its batch, nor on ``batch_size`` (see ``batch_invariant`` in
        :func:`onepeace.load` for the official batch-dependent audio path).

        ``long_audio`` (default: the model's ``long_audio`` attribute, ``"first"``): ``"first"`` (official) embeds
        the first ``cfg.audio.max_duration`` seconds of a clip; ``"windows"`` embeds every part of a longer clip in
        windows of that length (:func:`onepeace.data.audio.audio_windows`) and pools them: the mean of the
        normalised window embeddings, re-normalised. Clips no longer than one window give the same embedding either
        way.
        """
        long_audio = self.long_audio if long_audio is None else check_long_audio(long_audio)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        out: dict[str, torch.Tensor] = {}
        if text is not None:
            texts = _as_list(text)
            for i, t in enumerate(texts):
                if isinstance(t, str) and not t.strip():
                    raise InputError(f"text {i} is empty; give some words to embed")
            out["text"] = _batched(texts, batch_size, lambda b: self.encode_text(self.tokenize(b)))
        if image is not None:
            out["image"] = _batched(_as_list(image), batch_size, lambda b: self.encode_image(self.preprocess_image(b)))
        if audio is not None:
            clips = _as_list(audio)
            if long_audio == "windows":
                out["audio"] = _batched(clips, batch_size, lambda b: self._pooled_windows(b, sample_rate, batch_size))
            else:
                out["audio"] = _batched(
                    clips, batch_size, lambda b: self.encode_audio(*self.preprocess_audio(b, sample_rate))
                )
        if not out:
            raise InputError("give at least one of text=, image= or audio=")
        return Embeddings(**out)

    def compose(
        self,
        text: str | Sequence[str] | None = None,
        image: Any | Sequence[Any] | None = None,
        audio: Any | Sequence[Any] | None = None,
        *,
        sample_rate: int | None = None,
    ) -> torch.Tensor:
        """One query vector ``[D]`` from several inputs: the mean of their normalised embeddings, re-normalised.

        This is how the official maintainers combine modalities (e.g. a sound plus a text to find an image).
        """
        emb = self.embed(text=text, image=image, audio=audio, sample_rate=sample_rate)
        parts = [getattr(emb, m.value) for m in Modality if getattr(emb, m.value) is not None]
        return F.normalize(torch.cat(parts).float().mean(0), dim=-1)

    # ----------------------------------------------------------------------------------------- helpers
    def _pooled_windows(self, clips: list[Any], sample_rate: int | None, batch_size: int) -> torch.Tensor:
        """``[len(clips), D]``: each clip's windows embedded ``batch_size`` at a time, mean-pooled, re-normalised."""
        from onepeace.data.audio import collate_audio
        from onepeace.data.long_audio import clip_windows

        windows, owner = clip_windows(clips, self.cfg.audio, sample_rate)
        emb = _batched(windows, batch_size, lambda b: self.encode_audio(*collate_audio(b, self.cfg.audio))).float()
        pooled = torch.zeros(len(clips), emb.shape[1], device=emb.device).index_add_(
            0, torch.tensor(owner, device=emb.device), emb
        )
        return F.normalize(pooled, dim=-1).to(emb.dtype)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        return x.to(self.device)

    def _move(self, text, image, audio):
        text = None if text is None else self._to_device(text)
        image = None if image is None else self._to_device(image)
        if audio is not None:
            if not isinstance(audio, (tuple, list)) or len(audio) != 2:
                raise TypeError("audio must be a (waveform [B, N], padding_mask [B, T + 1]) pair")
            audio = (self._to_device(audio[0]), self._to_device(audio[1]))
        return text, image, audio


def _batched(items: list[Any], size: int, encode: Callable[[list[Any]], torch.Tensor]) -> torch.Tensor:
    """``encode`` over consecutive chunks of ``items``, concatenated: ``[len(items), D]``."""
    return batched(items, size, encode, torch.cat)
