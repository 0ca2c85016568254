"""Audio adapter: wav2vec2-style conv feature extractor, convolutional positions, 1-D relative bias (spec §2.2)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from onepeace.config import OnePeaceConfig
from onepeace.model.adapters.common import check_keep, fill_padding, gather_kept, kept_padding_mask
from onepeace.model.layers import LN_EPS, ChannelLayerNorm
from onepeace.model.outputs import AdapterOutput
from onepeace.model.position import RelPosBias, sequence_rel_pos_index


class ConvBlock(nn.Module):
    """Conv1d -> LayerNorm over channels -> GELU, ``[B, C_in, T] -> [B, C_out, T']``.

    Where the conv output is exactly zero in every channel (zero padding or digital silence under the receptive
    field) the LayerNorm output is its bias whatever the input, yet its input gradient is scaled by 1/sqrt(eps)
    ~ 316; through the zero-initialised stack that compounds to ~1e14 and swamps every other gradient under
    norm clipping. The backward pass therefore treats the norm output at those positions as a constant. The
    forward values are unchanged.
    """

    def __init__(self, conv: nn.Conv1d, affine: bool = True, trim_last: bool = False) -> None:
        super().__init__()
        self.conv = conv
        self.norm = ChannelLayerNorm(conv.out_channels, eps=LN_EPS, elementwise_affine=affine)
        self.trim_last = trim_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.trim_last:
            x = x[..., :-1]
        y = self.norm(x)
        if torch.is_grad_enabled() and y.requires_grad:
            blank = x.detach().abs().amax(dim=1, keepdim=True) == 0
            y = torch.where(blank, y.detach(), y)
        return F.gelu(y)


def feature_extractor(layers: tuple[tuple[int, int, int], ...]) -> nn.Sequential:
    """Strided conv stack over the raw waveform (no conv bias): ``[B, 1, N] -> [B, C, T]``."""
    blocks, channels_in = [], 1
    for channels, kernel, stride in layers:
        blocks.append(ConvBlock(nn.Conv1d(channels_in, channels, kernel, stride=stride, bias=False)))
        channels_in = channels
    return nn.Sequential(*blocks)


def conv_positions(dim: int, depth: int, kernel: int, groups: int) -> nn.Sequential:
    """Convolutional positional embedding: ``depth`` grouped convs with LayerNorm (no affine) and GELU."""
    return nn.Sequential(
        *(
            ConvBlock(
                nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups),
                affine=False,
                trim_last=kernel % 2 == 0,
            )
            for _ in range(depth)
        )
    )


class AudioAdapter(nn.Module):
    """``waveform [B, N]`` (16 kHz, standardised, zero-padded) + ``padding_mask [B, T + 1]`` -> ``[B, T + 1, D]``.

    With ``cfg.audio.batch_invariant`` (the default) padded frames are zeroed before every positional convolution,
    which is exactly what the convolution's own zero padding gives a clip run alone, so each real frame sees only its
    clip. Otherwise padding leaks into the last real frames, as in the official code.
    """

    def __init__(self, cfg: OnePeaceConfig) -> None:
        super().__init__()
        acfg, dim = cfg.audio, cfg.embed_dim
        self.extractor = feature_extractor(acfg.feature_layers)
        feat = acfg.feature_layers[-1][0]
        self.feature_norm = nn.LayerNorm(feat, eps=LN_EPS)
        self.feature_proj = nn.Linear(feat, dim)
        self.conv_pos = conv_positions(dim, acfg.conv_pos_depth, acfg.conv_pos_kernel, acfg.conv_pos_groups)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim))
        # Present in the released weights and counted in the 4B total; no forward pass reads it.
        self.mask_embedding = nn.Parameter(torch.zeros(1, dim))
        index = sequence_rel_pos_index(acfg.bucket_size, acfg.max_rel_positions)
        self.rel_pos = RelPosBias(index, 2 * acfg.bucket_size + 2, cfg.heads, cfg.num_rel_pos_tables)
        self.batch_invariant = acfg.batch_invariant
        self._shared: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    @contextmanager
    def sharing_frame_features(self) -> Iterator[None]:
        """Inside the block, the frame features of a waveform tensor are computed once and reused by every pass.

        The conv stack has no randomness, so each pass sees the values a separate computation gives, and the
        gradients of the passes add up in the one shared graph, as they would over separate graphs. The features
        are computed with autograd on even inside ``torch.no_grad`` (a teacher pass may come first); passes under
        ``no_grad`` still record nothing beyond them. Pretraining runs several masked views of one batch this way.
        """
        self._shared = {}
        try:
            yield
        finally:
            self._shared = None

    def frame_features(self, waveform: torch.Tensor) -> torch.Tensor:
        """Extractor -> LayerNorm -> Linear: ``[B, N] -> [B, T, D]``."""
        if self._shared is None:
            return self._frame_features(waveform)
        hit = self._shared.get(id(waveform))
        if hit is None or hit[0] is not waveform:
            with torch.enable_grad():
                hit = (waveform, self._frame_features(waveform))
            self._shared[id(waveform)] = hit
        return hit[1]

    def _frame_features(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.ndim != 2:
            raise ValueError(f"waveform must be [B, N], got shape {tuple(waveform.shape)}")
        waveform = waveform.to(self.extractor[0].conv.weight.dtype)  # also under mixed precision
        feats = self.extractor(waveform.unsqueeze(1)).transpose(1, 2)  # [B, T, C]
        return self.feature_proj(self.feature_norm(feats))

    def positions(self, feats: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """Convolutional positional embedding of frame features, ``[B, T, D] -> [B, T, D]``.

        ``padding``: optional ``[B, T]`` bool (True = padded frame); those frames enter every block as zeros.
        """
        x = feats.transpose(1, 2)  # [B, D, T]
        if padding is None:
            return self.conv_pos(x).transpose(1, 2)
        real = (~padding).unsqueeze(1).to(x.dtype)  # [B, 1, T]
        for block in self.conv_pos:
            x = block(x * real)
        return x.transpose(1, 2)

    def forward(
        self, waveform: torch.Tensor, padding_mask: torch.Tensor, keep: torch.Tensor | None = None
    ) -> AdapterOutput:
        """Embed audio.

        Args:
            waveform: ``[B, N]``.
            padding_mask: ``[B, T + 1]`` bool (True = pad, cls column first) from the clip lengths.
            keep: optional ``[B, S_keep]`` kept positions (cls = 0, frame t at t + 1, -1 = pad); the
                positional convolution then runs over the kept frames only, as in the official pretraining.
        """
        feats = self.frame_features(waveform)  # [B, T, D]
        batch, length = feats.shape[0], feats.shape[1] + 1
        if padding_mask.shape != (batch, length):
            raise ValueError(
                f"audio padding mask has shape {tuple(padding_mask.shape)} but the waveform gives "
                f"{length - 1} frames, so it must be {(batch, length)}"
            )
        frame_padding = padding_mask[:, 1:].bool()
        if keep is not None:
            check_keep(keep, length, "audio")
            feats = gather_kept(feats, fill_padding(keep)[:, 1:] - 1)  # frame t sits at position t + 1
            frame_padding = kept_padding_mask(keep)[:, 1:]
        pos = self.positions(feats, frame_padding if self.batch_invariant else None)
        x = torch.cat([self.cls_token.expand(batch, -1, -1), feats], dim=1)
        x = x + torch.cat([self.cls_pos.expand(batch, -1, -1), pos], dim=1)
        if keep is None:
            return AdapterOutput(x, padding_mask.bool(), self.rel_pos(length))
        return AdapterOutput(x, kept_padding_mask(keep), self.rel_pos(length, fill_padding(keep)))
