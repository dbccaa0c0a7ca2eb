"""Streamed text: the deltas add up to exactly the non-streamed answer, whatever the tokens and however they
arrive, with the byte-level BPE tokenizer the model uses (Cyrillic characters span several tokens)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.pipeline.textstream import IncrementalText


@pytest.fixture(scope="module")
def decode(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir / "base-model")
    return lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True), len(tokenizer)


def stream(decode, tokens: list[int], cuts: list[int]) -> list[str]:
    text = IncrementalText(decode)
    deltas, start = [], 0
    for cut in sorted(set(cuts)) + [len(tokens)]:
        deltas.append(text.push(tokens[start:cut]))
        start = cut
    final = decode(tokens).strip()
    assert final.startswith("".join(deltas))  # nothing sent is ever taken back
    deltas.append(text.finish(final))
    return deltas


def test_random_tokens_in_random_pieces_add_up_to_the_answer(decode):
    decode_fn, vocabulary = decode

    @settings(max_examples=300, deadline=None)
    @given(st.data())
    def check(data):
        tokens = data.draw(st.lists(st.integers(0, vocabulary - 1), max_size=60))
        cuts = data.draw(st.lists(st.integers(0, len(tokens)), max_size=20))
        assert "".join(stream(decode_fn, tokens, cuts)) == decode_fn(tokens).strip()

    check()


def test_a_character_split_across_tokens_is_sent_whole():
    text = IncrementalText(lambda tokens: bytes(tokens).decode("utf-8", errors="replace"))
    word = "Роль".encode()
    deltas = [text.push([byte]) for byte in word]
    assert deltas == ["", "Р", "", "о", "", "л", "", "ь"]


def test_whitespace_waits_for_what_follows_and_the_ends_are_stripped():
    text = IncrementalText(lambda tokens: "".join(chr(token) for token in tokens))
    pushed = [text.push([ord(c)]) for c in "\n a b \n"]
    assert pushed == ["", "", "a", "", " b", "", ""]
    assert text.finish("a b") == ""
