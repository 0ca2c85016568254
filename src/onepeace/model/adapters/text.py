"""Language adapter: token embeddings, a learned cls vector, absolute and 1-D relative positions (spec §2.3)."""

from __future__ import annotations

import torch
from torch import nn

from onepeace.config import OnePeaceConfig
from onepeace.model.adapters.common import check_keep, fill_padding, gather_kept, kept_padding_mask
from onepeace.model.outputs import AdapterOutput
from onepeace.model.position import RelPosBias, sequence_rel_pos_index


class TextAdapter(nn.Module):
    """``tokens [B, n]`` (no bos; eos included; right-padded with pad) -> ``[B, n + 1, D]`` with cls first."""

    def __init__(self, cfg: OnePeaceConfig) -> None:
        super().__init__()
        tcfg = cfg.text
        self.pad_id = tcfg.pad_id
        self.token_embed = nn.Embedding(tcfg.vocab_size, cfg.embed_dim, padding_idx=tcfg.pad_id)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Embedding(tcfg.max_positions, cfg.embed_dim)
        index = sequence_rel_pos_index(tcfg.bucket_size, tcfg.max_rel_positions)
        self.rel_pos = RelPosBias(index, 2 * tcfg.bucket_size + 2, cfg.heads, cfg.num_rel_pos_tables)

    @property
    def max_length(self) -> int:
        """Longest token sequence accepted (without the cls slot)."""
        return min(self.pos_embed.num_embeddings, self.rel_pos.index.shape[0]) - 1

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> AdapterOutput:
        """Embed tokens.

        Args:
            tokens: ``[B, n]`` int64 dictionary ids.
            keep: optional ``[B, S_keep]`` kept positions of the ``n + 1``-long sequence (cls = 0, -1 = pad).

        Returns:
            AdapterOutput with embedding ``[B, S, D]`` (S = n + 1, or S_keep), padding mask ``[B, S]``.
        """
        if tokens.shape[1] > self.max_length:
            raise ValueError(f"text has {tokens.shape[1]} tokens; at most {self.max_length} fit the position tables")
        batch, length = tokens.shape[0], tokens.shape[1] + 1
        x = torch.cat([self.cls_token.expand(batch, -1, -1), self.token_embed(tokens)], dim=1)  # [B, S, D]
        x = x + self.pos_embed.weight[:length].unsqueeze(0)
        padding = torch.cat([tokens.new_zeros(batch, 1, dtype=torch.bool), tokens.eq(self.pad_id)], dim=1)
        if keep is None:
            return AdapterOutput(x, padding, self.rel_pos(length))
        check_keep(keep, length, "text")
        x = gather_kept(x, keep)
        return AdapterOutput(x, kept_padding_mask(keep), self.rel_pos(length, fill_padding(keep)))
