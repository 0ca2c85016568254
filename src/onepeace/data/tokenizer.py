"""Text tokeniser reproducing the official ONE-PEACE text preprocessing (spec §2.3).

Pipeline: GPT-2 byte-level BPE (``encoder.json`` + ``vocab.bpe``) turns ``" " + text.lower()``
into GPT-2 ids; each GPT-2 id is mapped to its index in the fairseq dictionary ``dict.txt``
(index = 4 + line number, after the specials ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3);
the first ``max_tokens`` (70) indices are kept and eos (2) is appended. No bos is added. Batches
are right-padded with 1. The data files ship inside the package.

Long texts are cut before the BPE runs (:meth:`Tokenizer.bounded_text`), so a text of megabytes costs as much as
one of a few thousand characters and gives the same ids.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from onepeace.data import is_tensor
from onepeace.errors import InputError

if TYPE_CHECKING:
    import torch

BOS_ID = 0
PAD_ID = 1
EOS_ID = 2
UNK_ID = 3
NUM_SPECIALS = 4
SPECIAL_SYMBOLS = ("<s>", "<pad>", "</s>", "<unk>")
MAX_TOKENS = 70
WORD_START_MARK = "\u0120"  # 'Ġ', the byte-level symbol of the space byte
LONGEST_TOKEN_BYTES = 128
"""Bytes of the longest GPT-2 token (so ``n`` bytes of a word give at least ``n / 128`` tokens)."""
CUT_MARGIN_BYTES = 1024
"""Text kept beyond the bytes the kept tokens can span, when a cut falls inside one long word."""

_LEADING_PUNCTUATION = ",.!?*#:;~"
_WHITESPACE_RUN = re.compile(r"\s{2,}")


def _read_asset(name: str) -> str:
    return resources.files("onepeace").joinpath("assets").joinpath("bpe").joinpath(name).read_text(encoding="utf-8")


def _parse_merges(text: str) -> list[tuple[str, str]]:
    """Merge pairs of ``vocab.bpe`` in priority order (skipping the ``#version`` header and blank lines)."""
    merges = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#version"):
            continue
        left, right = line.split()
        merges.append((left, right))
    return merges


def _parse_dictionary(text: str) -> list[str]:
    """Symbols of a fairseq ``dict.txt`` (``symbol count`` per line), in file order."""
    return [line.rsplit(" ", 1)[0] for line in text.splitlines() if line.strip()]


def _build_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> _HFTokenizer:
    bpe = _HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    return bpe


class Tokenizer:
    """GPT-2 BPE + fairseq dictionary tokeniser with the official API behaviour.

    Construction reads the packaged BPE files once (about 0.2 s); reuse the instance
    (see :func:`default_tokenizer`).
    """

    def __init__(self, max_tokens: int = MAX_TOKENS) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        self.max_tokens = int(max_tokens)
        vocab = json.loads(_read_asset("encoder.json"))
        self._bpe = _build_bpe(vocab, _parse_merges(_read_asset("vocab.bpe")))
        symbols = list(SPECIAL_SYMBOLS) + _parse_dictionary(_read_asset("dict.txt"))
        gpt2_strings = {idx: tok for tok, idx in vocab.items()}
        self._symbols = symbols
        self._gpt2_to_dict = np.full(len(vocab), UNK_ID, dtype=np.int64)
        self._dict_to_gpt2 = np.full(len(symbols), -1, dtype=np.int64)
        word_start = np.ones(len(symbols), dtype=bool)
        for index in range(NUM_SPECIALS, len(symbols)):
            symbol = symbols[index]
            if not (symbol.isascii() and symbol.isdigit()):
                continue  # madeupword entries: never produced by the BPE, count as word starts
            gpt2_id = int(symbol)
            if gpt2_id < len(vocab):
                self._gpt2_to_dict[gpt2_id] = index
                self._dict_to_gpt2[index] = gpt2_id
                word_start[index] = gpt2_strings[gpt2_id].startswith(WORD_START_MARK)
        self._word_start = word_start

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Number of dictionary entries (50264: 4 specials + 50257 GPT-2 ids + 3 madeupwords)."""
        return len(self._symbols)

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def word_start_table(self) -> torch.BoolTensor:
        """``BoolTensor [vocab_size]``: True where the entry starts a word (see :meth:`is_word_start`)."""
        import torch

        return torch.from_numpy(self._word_start.copy())

    # ------------------------------------------------------------------ encoding
    def bpe_ids(self, text: str) -> list[int]:
        """Raw GPT-2 ids of the whole ``" " + text.lower()`` (before dictionary lookup and truncation; not cut)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._bpe.encode(" " + text.lower(), add_special_tokens=False).ids

    def bounded_text(self, text: str) -> str:
        """The prefix of a BPE input (``" " + text.lower()``) that is tokenised instead of the whole.

        The GPT-2 pre-tokeniser splits the input into pieces (words, number runs, punctuation runs, spaces) and the
        BPE never merges across pieces, each of which gives at least one token and at least ``bytes / 128``. Pieces
        before a cut keep their boundaries (a piece depends only on the characters up to its end), so a cut after
        pieces that give ``max_tokens`` tokens keeps the first ``max_tokens`` ids exactly. When a single long word
        comes first, the cut falls inside it, ``max_tokens * 128 + 1024`` characters after its start: the kept
        tokens span at most ``max_tokens * 128`` bytes, followed by at least 1024 bytes of the same word, which is
        the one assumption (BPE merges do not reach 1 KB back; checked on random texts in the tests). The input
        kept is at most ``2 * (max_tokens * 128 + 1024)`` characters.
        """
        window = self.max_tokens * LONGEST_TOKEN_BYTES + CUT_MARGIN_BYTES
        if len(text) <= 2 * window:
            return text
        pieces = self._bpe.pre_tokenizer.pre_tokenize_str(text[: 2 * window])
        tokens = 0
        for piece, (_, end) in pieces[:-1]:  # the last piece may continue past the prefix
            tokens += -(-len(piece) // LONGEST_TOKEN_BYTES)  # byte-level symbols: one per byte
            if tokens >= self.max_tokens:
                return text[:end]
        # pieces before the last give fewer than max_tokens tokens, so they span fewer than 128 * max_tokens
        # characters: the last piece starts before ``window`` and reaches the prefix's end, ``window`` further
        return text[: pieces[-1][1][0] + window]

    def _finish(self, gpt2_ids: Sequence[int]) -> list[int]:
        ids = self._gpt2_to_dict[np.asarray(gpt2_ids, dtype=np.int64)][: self.max_tokens]
        return ids.tolist() + [EOS_ID]

    def encode(self, text: str) -> list[int]:
        """Dictionary ids of one string, as the official API makes them: up to ``max_tokens``, then eos."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        bounded = self.bounded_text(" " + text.lower())
        return self._finish(self._bpe.encode(bounded, add_special_tokens=False).ids)

    def __call__(self, texts: str | Sequence[str]) -> torch.LongTensor:
        """Tokenise one string or a batch: ``LongTensor [B, n]``, right-padded with ``pad_id`` (1).

        ``n`` is the longest sequence of the batch (eos included, at most ``max_tokens + 1``).
        """
        import torch

        return torch.from_numpy(self.encode_batch(texts))

    def encode_batch(self, texts: str | Sequence[str]) -> np.ndarray:
        """What :meth:`__call__` gives, as an int64 numpy array ``[B, n]`` (no torch needed)."""
        batch = [texts] if isinstance(texts, str) else _check_texts(texts)
        rows = [self.encode(text) for text in batch]
        out = np.full((len(rows), max(len(r) for r in rows)), PAD_ID, dtype=np.int64)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out

    @staticmethod
    def normalize(text: str, max_words: int | None = None) -> str:
        """Dataset-style caption normalisation applied before :meth:`encode` by the training datasets.

        Lowercase; strip leading ``, . ! ? * # : ; ~``; replace runs of two or more whitespace characters and
        every tab by one space; strip trailing newlines, then surrounding spaces; optionally keep the first
        ``max_words`` space-separated words.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        text = text.lower().lstrip(_LEADING_PUNCTUATION)
        text = _WHITESPACE_RUN.sub(" ", text).replace("\t", " ")
        text = text.rstrip("\n").strip(" ")
        if max_words is not None:
            words = text.split(" ")
            if len(words) > max_words:
                text = " ".join(words[:max_words])
        return text

    # ------------------------------------------------------------------ decoding
    def _check_ids(self, ids: Sequence[int] | torch.Tensor) -> np.ndarray:
        arr = np.asarray(ids.detach().cpu() if is_tensor(ids) else list(ids))
        if arr.ndim != 1:
            raise InputError(f"token ids must be one-dimensional, got shape {tuple(arr.shape)}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"token ids must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)
        bad = np.flatnonzero((arr < 0) | (arr >= self.vocab_size))
        if bad.size:
            raise InputError(f"token id {int(arr[bad[0]])} at position {int(bad[0])} is outside [0, {self.vocab_size})")
        return arr

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of dictionary ids ``[n]``; specials and madeupword entries are skipped.

        The single leading space that :meth:`encode` adds is removed, so ``decode(encode(s)) == s`` for a
        lowercase string without leading space that fits in ``max_tokens``.
        """
        gpt2 = self._dict_to_gpt2[self._check_ids(ids)]
        text = self._bpe.decode(gpt2[gpt2 >= 0].tolist(), skip_special_tokens=False)
        return text.removeprefix(" ")

    def is_word_start(self, ids: Sequence[int] | torch.Tensor) -> list[bool]:
        """Per id ``[n]``: True when the entry begins a word (its GPT-2 string starts with Ġ, the space).

        Specials (bos, pad, eos, unk) and madeupword entries count as word starts, as in fairseq's
        whole-word masking.
        """
        return self._word_start[self._check_ids(ids)].tolist()

    def symbol(self, index: int) -> str:
        """Dictionary symbol of ``index`` (a GPT-2 id as a decimal string, a special, or a madeupword)."""
        return self._symbols[index]


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
    batch = list(texts)
    if not batch:
        raise InputError("texts is empty: give at least one string")
    for i, text in enumerate(batch):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
    return batch


@lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """A shared :class:`Tokenizer` built on first use."""
    return Tokenizer()


@lru_cache(maxsize=8)
def tokenizer_for(max_tokens: int) -> Tokenizer:
    """A shared :class:`Tokenizer` keeping ``max_tokens`` BPE tokens (one per limit and process)."""
    return default_tokenizer() if max_tokens == MAX_TOKENS else Tokenizer(max_tokens)
