"""Tokenizer parity with the official ONE-PEACE text preprocessing (tests/fixtures/official_bpe)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from onepeace.data.tokenizer import Tokenizer, default_tokenizer
from onepeace.errors import InputError

VECTORS = json.loads(
    (Path(__file__).parent / "fixtures" / "official_bpe" / "tokenization.json").read_text(encoding="utf-8")
)
ITEMS = VECTORS["items"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


def _item_id(item: dict) -> str:
    return repr(item["text"][:24])


@pytest.mark.parametrize("item", ITEMS, ids=_item_id)
def test_api_ids_match_official(tok: Tokenizer, item: dict) -> None:
    assert tok.encode(item["text"]) == item["api_ids"]
    assert tok(item["text"]).tolist() == [item["api_ids"]]


@pytest.mark.parametrize("item", ITEMS, ids=_item_id)
def test_gpt2_ids_match_official(tok: Tokenizer, item: dict) -> None:
    ids = tok.bpe_ids(item["text"])
    assert ids == item["gpt2_bpe_ids"]
    assert len(ids) == item["api_num_tokens_before_truncation"]


@pytest.mark.parametrize("item", ITEMS, ids=_item_id)
def test_dataset_path_matches_official(tok: Tokenizer, item: dict) -> None:
    normalized = tok.normalize(item["text"])
    assert normalized == item["dataset_normalized_text"]
    assert tok.encode(normalized) == item["dataset_ids"]


def test_batch_example_is_right_padded(tok: Tokenizer) -> None:
    example = VECTORS["batch_example"]
    batch = tok(example["texts"])
    assert batch.dtype == torch.long
    assert batch.tolist() == example["api_ids"]


def test_vocabulary_and_specials(tok: Tokenizer) -> None:
    assert tok.vocab_size == VECTORS["vocab_size"] == 50264
    specials = VECTORS["special_ids"]
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id) == (
        specials["bos"],
        specials["pad"],
        specials["eos"],
        specials["unk"],
    )
    assert [tok.symbol(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert tok.symbol(50263) == "madeupword0002"


def test_truncation_keeps_70_tokens_then_eos(tok: Tokenizer) -> None:
    item = max(ITEMS, key=lambda it: it["api_num_tokens_before_truncation"])
    assert item["api_num_tokens_before_truncation"] > VECTORS["max_src_length"]
    ids = tok.encode(item["text"])
    assert len(ids) == VECTORS["max_src_length"] + 1 and ids[-1] == 2
    assert tok([item["text"], "a"]).shape == (2, 71)


def test_word_start_flags(tok: Tokenizer) -> None:
    # "the dog is wagging its tail" -> Ġthe Ġdog Ġis Ġwag ging Ġits Ġtail </s>
    ids = tok.encode("the dog is wagging its tail")
    assert tok.is_word_start(ids) == [True, True, True, True, False, True, True, True]
    assert tok.decode(ids[3:5]) == "wagging"
    # specials and madeupwords count as word starts; 50260 is GPT-2 id 50256 ("<|endoftext|>", no space)
    assert tok.is_word_start([0, 1, 2, 3, 50261, 50262, 50263]) == [True] * 7
    assert tok.is_word_start([50260]) == [False]
    table = tok.word_start_table
    assert table.shape == (50264,) and table.dtype == torch.bool
    assert table[torch.tensor(ids)].tolist() == tok.is_word_start(torch.tensor(ids))


def test_decode_round_trip(tok: Tokenizer) -> None:
    text = "a man is riding a horse on the beach."
    assert tok.decode(tok.encode(text)) == text
    batch = tok([text, "hi"])
    assert tok.decode(batch[1]) == "hi"  # pad and eos are skipped
    assert tok.decode(tok.encode("naïve café 日本語 😀")) == "naïve café 日本語 😀"


def test_empty_string_is_a_space_token(tok: Tokenizer) -> None:
    assert tok.encode("") == [1437, 2]
    assert tok.decode([1437, 2]) == ""


def test_normalize_max_words(tok: Tokenizer) -> None:
    assert tok.normalize("  One two\t three four ", max_words=2) == "one two"


def test_type_errors_name_the_index(tok: Tokenizer) -> None:
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str, got int"):
        tok(["fine", 3])
    with pytest.raises(TypeError, match="must be a str"):
        tok.encode(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sequence of str"):
        tok(12)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="empty"):
        tok([])


def test_decode_rejects_out_of_range_ids(tok: Tokenizer) -> None:
    with pytest.raises(InputError, match="outside"):
        tok.decode([5, 50264])
    with pytest.raises(InputError, match="one-dimensional"):
        tok.is_word_start(torch.zeros(2, 2, dtype=torch.long))


def test_default_tokenizer_is_shared() -> None:
    assert default_tokenizer() is default_tokenizer()
