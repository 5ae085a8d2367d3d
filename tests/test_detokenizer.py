"""Incremental detokenization: deltas add up to the full text and never split a character."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from replicas.detokenizer import IncrementalDetokenizer

TEXT = "Grüße aus Köln! 你好，世界 🎉🚀 naïve café — done."


@pytest.fixture(scope="module")
def tokenizer(smol_dir):
    return AutoTokenizer.from_pretrained(smol_dir)


def stream(tokenizer, text, **kwargs):
    prompt = tokenizer.encode("Say:")
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer.backend_tokenizer, prompt, **kwargs)
    deltas, stop = [], None
    for i, token in enumerate(ids):
        stop = detok.update(token)
        deltas.append(detok.take_delta(finished=stop is not None or i == len(ids) - 1))
        if stop is not None:
            break
    return deltas, stop


def test_multibyte_characters_are_never_split(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids), (
        "the text must split characters across tokens"
    )
    deltas, _ = stream(tokenizer, TEXT)
    assert all("\ufffd" not in d for d in deltas), "a delta held half a character"
    assert "".join(deltas) == TEXT


def test_stop_string_is_cut_and_never_streamed(tokenizer):
    deltas, stop = stream(tokenizer, TEXT, stop=["世界", "zzz"])
    assert stop == "世界"
    assert "".join(deltas) == TEXT[: TEXT.index("世界")]
    assert not any("世" in d for d in deltas), "part of the stop string was streamed"


def test_stop_string_kept_when_asked(tokenizer):
    deltas, _ = stream(tokenizer, TEXT, stop=["café"], include_stop_str_in_output=True)
    assert "".join(deltas) == TEXT[: TEXT.index("café") + len("café")]


def test_earliest_stop_string_wins(tokenizer):
    deltas, stop = stream(tokenizer, "one two three four", stop=["four", "two"])
    assert stop == "two" and "".join(deltas) == "one "


def test_special_tokens_are_skipped(tokenizer):
    eos = tokenizer.eos_token_id
    detok = IncrementalDetokenizer(tokenizer.backend_tokenizer, [1], skip_special_tokens=True)
    for token in tokenizer.encode("hello", add_special_tokens=False) + [eos]:
        detok.update(token)
    assert detok.take_delta(finished=True) == "hello"


def test_a_prompt_ending_inside_a_character_does_not_leak_into_the_output(tokenizer):
    """Token-id prompts can end with half of a UTF-8 character: the output is still only the
    output's text."""
    emoji = tokenizer.encode("🎉", add_special_tokens=False)
    assert len(emoji) > 1, "the test needs a character spread over several tokens"
    prompt = tokenizer.encode("Say:") + emoji[:-1]
    detok = IncrementalDetokenizer(tokenizer.backend_tokenizer, prompt)
    for token in tokenizer.encode(" ok", add_special_tokens=False):
        detok.update(token)
    assert detok.take_delta(finished=True) == " ok"
