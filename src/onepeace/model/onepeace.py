"""ONE-PEACE: modality adapters -> shared fusion encoder -> per-modality projection heads (spec §2-4)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from onepeace.config import OnePeaceConfig
from onepeace.modality import Modality
from onepeace.model.adapters import build_adapter
from onepeace.model.encoder import EncoderOutput, FusionEncoder
from onepeace.model.init import init_weights
from onepeace.model.outputs import AdapterOutput, Features

LOGIT_SCALE_MAX = math.log(100.0)


class AudioInput(NamedTuple):
    """A batch of audio: ``waveform [B, N]`` and ``padding_mask [B, T + 1]`` (True = pad)."""

    waveform: torch.Tensor
    padding_mask: torch.Tensor


class OnePeaceModel(nn.Module):
    """The ONE-PEACE network for one device. Inputs are model-ready tensors; see :mod:`onepeace.api` for raw data."""

    def __init__(self, cfg: OnePeaceConfig, init: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.adapters = nn.ModuleDict({m.value: build_adapter(m, cfg) for m in cfg.modalities})
        self.encoder = FusionEncoder(
            cfg.embed_dim,
            cfg.layers,
            cfg.heads,
            cfg.ffn_dim,
            cfg.modalities,
            cfg.layer_scale_init,
            cfg.drop_path_rate,
        )
        self.projections = nn.ModuleDict({m.value: nn.Linear(cfg.embed_dim, cfg.embed_dim) for m in cfg.modalities})
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        if init:
            init_weights(self)

    @property
    def modalities(self) -> tuple[Modality, ...]:
        return self.cfg.modalities

    def adapter(self, modality: Modality) -> nn.Module:
        """The adapter of ``modality``; ``ValueError`` if this model has no such branch."""
        if modality.value not in self.adapters:
            built = ", ".join(m.value for m in self.modalities)
            raise ValueError(f"this model has no {modality.value} branch (it has: {built})")
        return self.adapters[modality.value]

    def embed_inputs(
        self,
        text: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        audio: AudioInput | tuple[torch.Tensor, torch.Tensor] | None = None,
        keep: dict[Modality, torch.Tensor] | None = None,
        check_values: bool = True,
    ) -> dict[Modality, AdapterOutput]:
        """Run the adapters of the modalities given (``keep``: optional kept positions per modality, §2.5).

        ``check_values=False`` turns the token-range check into a device-side assert (no host sync), for
        training batches whose values the data layer built; the default raises ``ValueError`` at once.
        """
        keep = keep or {}
        out: dict[Modality, AdapterOutput] = {}
        if text is not None:
            self._check_tokens(text, check_values)
            out[Modality.TEXT] = self.adapter(Modality.TEXT)(text, keep.get(Modality.TEXT))
        if image is not None:
            out[Modality.IMAGE] = self.adapter(Modality.IMAGE)(image, keep.get(Modality.IMAGE))
        if audio is not None:
            waveform, padding_mask = _audio_pair(audio)
            out[Modality.AUDIO] = self.adapter(Modality.AUDIO)(waveform, padding_mask, keep.get(Modality.AUDIO))
        if not out:
            raise ValueError("give at least one of text, image or audio")
        return out

    def forward_features(
        self,
        text: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        audio: AudioInput | tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        keep: dict[Modality, torch.Tensor] | None = None,
        return_intermediates: bool = False,
        check_values: bool = True,
    ) -> Features:
        """One encoder pass over the modalities given (several = one joint pass, text first).

        Args:
            text: ``[B, n]`` token ids. image: ``[B, 3, S, S]``. audio: ``(waveform [B, N], padding_mask [B, T+1])``.
            keep: optional kept positions per modality for masked (denoising) passes.
            check_values: see :meth:`embed_inputs` (False: no host sync for the token check).

        Returns:
            Features whose ``.text`` / ``.image`` / ``.audio`` are SegmentOutput(hidden ``[B, S_m, D]``,
            padding_mask ``[B, S_m]``); modalities not given are None.
        """
        encoded = self.encode_inputs(self.embed_inputs(text, image, audio, keep, check_values), return_intermediates)
        seg = encoded.segments
        return Features(
            text=seg.get(Modality.TEXT),
            image=seg.get(Modality.IMAGE),
            audio=seg.get(Modality.AUDIO),
            intermediates=encoded.intermediates,
        )

    def encode_inputs(self, inputs: dict[Modality, AdapterOutput], return_intermediates: bool = False) -> EncoderOutput:
        """Fusion encoder over adapter outputs (exposed for pretraining objectives)."""
        return self.encoder(inputs, return_intermediates)

    def forward_intermediates(
        self,
        text: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        audio: AudioInput | tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Residual stream after every layer: L tensors ``[B, S_total, D]`` before the final norms."""
        return self.forward_features(text, image, audio, return_intermediates=True).intermediates

    def project(self, modality: Modality, hidden: torch.Tensor) -> torch.Tensor:
        """Global embedding from a segment's hidden states: cls -> projection -> L2 norm, ``[B, S, D] -> [B, D]``."""
        return F.normalize(self.projections[modality.value](hidden[:, 0]), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, n]`` -> L2-normalised ``[B, D]``."""
        return self.project(Modality.TEXT, self.forward_features(text=tokens).text.hidden)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels [B, 3, S, S]`` -> L2-normalised ``[B, D]``."""
        return self.project(Modality.IMAGE, self.forward_features(image=pixels).image.hidden)

    def encode_audio(self, waveform: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """``waveform [B, N]``, ``padding_mask [B, T + 1]`` -> L2-normalised ``[B, D]``."""
        return self.project(Modality.AUDIO, self.forward_features(audio=(waveform, padding_mask)).audio.hidden)

    def forward(
        self,
        text: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        audio: AudioInput | tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[Modality, torch.Tensor]:
        """Unimodal global embeddings of every modality given (separate passes), ``{modality: [B, D]}``."""
        out = {}
        if text is not None:
            out[Modality.TEXT] = self.encode_text(text)
        if image is not None:
            out[Modality.IMAGE] = self.encode_image(image)
        if audio is not None:
            out[Modality.AUDIO] = self.encode_audio(*_audio_pair(audio))
        return out

    def logit_scale_exp(self) -> torch.Tensor:
        """``exp(logit_scale)`` with the scale clamped to ``[0, ln 100]`` (the official clamp)."""
        return self.logit_scale.clamp(0, LOGIT_SCALE_MAX).exp()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each fusion layer in backward instead of storing its activations."""
        self.encoder.grad_checkpointing = enable

    def _check_tokens(self, tokens: torch.Tensor, check_values: bool = True) -> None:
        if tokens.dtype not in (torch.int64, torch.int32) or tokens.ndim != 2:
            raise ValueError(f"text tokens must be an integer [B, n] tensor, got {tokens.dtype} {tuple(tokens.shape)}")
        vocab = self.cfg.text.vocab_size
        if not check_values:
            inside = ((tokens >= 0) & (tokens < vocab)).all()
            torch._assert_async(inside, f"a token id is outside the vocabulary (0..{vocab - 1})")
            return
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
            bad = tokens[(tokens < 0) | (tokens >= vocab)][0].item()
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")


def _audio_pair(audio: AudioInput | tuple[torch.Tensor, torch.Tensor]) -> AudioInput:
    if not isinstance(audio, tuple) or len(audio) != 2:
        raise TypeError("audio must be a (waveform [B, N], padding_mask [B, T + 1]) pair")
    return AudioInput(*audio)
