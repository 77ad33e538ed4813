"""TextAssembler: generated ids -> text, incrementally, with stop sequences (the same for every engine)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from genloom.services.inference.text import TextAssembler

TEXT = "Héllo 世界! The end. STOP here 🚀 and more"


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(default_model_dir))


def feed(assembler: TextAssembler, ids: list[int]) -> list[str]:
    parts = [assembler.push([i]) for i in ids]
    parts.append(assembler.finish())
    return parts


def test_one_token_at_a_time_reproduces_the_text_without_broken_characters(tokenizer: Any) -> None:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    parts = feed(TextAssembler(tokenizer), ids)
    assert "".join(parts) == TEXT
    assert not any("\ufffd" in p for p in parts)  # bytes of 世, 界 and 🚀 were held until complete


def test_stop_sequence_ends_text_before_the_match(tokenizer: Any) -> None:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assembler = TextAssembler(tokenizer, stop=["STOP", "never"])
    assert "".join(feed(assembler, ids)) == "Héllo 世界! The end. "
    assert assembler.stop_sequence == "STOP"
    assert assembler.text == "Héllo 世界! The end. "


def test_possible_stop_prefix_is_held_back_then_released(tokenizer: Any) -> None:
    ids = tokenizer("The end. ST is not STOP", add_special_tokens=False)["input_ids"]
    assembler = TextAssembler(tokenizer, stop=["STX"])
    released = ""
    for i in ids:
        released += assembler.push([i])
        assert not released.endswith("ST")  # "ST" could still become "STX"
    released += assembler.finish()
    assert released == "The end. ST is not STOP" and assembler.stop_sequence is None


def test_earliest_match_wins_and_min_new_tokens_defers_stops(tokenizer: Any) -> None:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assembler = TextAssembler(tokenizer, stop=["STOP", "end"])
    assert "".join(feed(assembler, ids)) == "Héllo 世界! The "
    assert assembler.stop_sequence == "end"
    late = TextAssembler(tokenizer, stop=["end"], min_new_tokens=len(ids))
    assert "".join(feed(late, ids)) == TEXT and late.stop_sequence is None


def test_special_tokens_skipped_or_kept(tokenizer: Any) -> None:
    ids = [*tokenizer("hi", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    assert "".join(feed(TextAssembler(tokenizer), ids)) == "hi"
    assert "".join(feed(TextAssembler(tokenizer, skip_special_tokens=False), ids)) == "hi<|im_end|>"


def test_unfinished_character_at_the_end_becomes_replacement(tokenizer: Any) -> None:
    ids = tokenizer("世", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    assembler = TextAssembler(tokenizer)
    assert assembler.push(ids[:-1]) == ""
    assert assembler.finish() == "\ufffd"
