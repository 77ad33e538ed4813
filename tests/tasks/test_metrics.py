"""Evaluate's metrics against values computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import numpy as np
import pytest

from genloom.services.tasks.metrics import (
    LabelScore,
    answer_scores,
    classification_scores,
    exact_match,
    percentile,
    rouge,
    squad_normalize,
    token_f1,
)


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Eiffel  Tower.", "eiffel tower"),
        ("An apple a day", "apple day"),
        ("  Cat's, hat!\n", "cats hat"),  # punctuation is removed, not replaced by a space
        ("theater anthem", "theater anthem"),  # articles only as whole words
        ("the", ""),
        ("", ""),
    ],
)
def test_squad_normalize(text: str, normalized: str) -> None:
    assert squad_normalize(text) == normalized


def test_exact_match_ignores_case_articles_and_punctuation_and_takes_the_best_gold() -> None:
    assert exact_match("the Eiffel Tower.", ["Eiffel tower"]) == 1.0
    assert exact_match("Paris", ["London", "paris!"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match("Paris", []) == 0.0


def test_token_f1_by_hand() -> None:
    # "the big red dog" -> [big, red, dog]; "a red dog barked" -> [red, dog, barked]: 2 shared tokens,
    # P = 2/3, R = 2/3, F1 = 2/3.
    assert token_f1("the big red dog", ["a red dog barked"]) == pytest.approx(2 / 3)
    # Best over golds: against [red, dog], P = 2/3, R = 2/2, F1 = 2 * (2/3 * 1) / (2/3 + 1) = 0.8.
    assert token_f1("the big red dog", ["cat", "red dog"]) == pytest.approx(0.8)
    # Shared tokens count with multiplicity: [dog, dog, dog] vs [dog] share 1; P = 1/3, R = 1, F1 = 0.5.
    assert token_f1("dog dog dog", ["dog"]) == pytest.approx(0.5)
    assert token_f1("Paris", ["London"]) == 0.0


def test_token_f1_of_empty_answers() -> None:
    assert token_f1("", [""]) == 1.0
    assert token_f1("The.", ["a"]) == 1.0  # both normalize to nothing
    assert token_f1("", ["Paris"]) == 0.0
    assert token_f1("Paris", [""]) == 0.0
    assert token_f1("Paris", []) == 0.0


def test_answer_scores_handle_unanswerable_items_all_or_nothing() -> None:
    assert answer_scores("", True, [], True) == (1.0, 1.0)
    assert answer_scores("Paris", False, [], True) == (0.0, 0.0)
    assert answer_scores("", True, ["Paris"], False) == (0.0, 0.0)
    assert answer_scores("paris.", False, ["Paris"], False) == (1.0, 1.0)
    em, f1 = answer_scores("in Paris", False, ["Paris"], False)
    # [in, paris] vs [paris]: P = 1/2, R = 1, F1 = 2/3; not an exact match.
    assert em == 0.0
    assert f1 == pytest.approx(2 / 3)


def test_rouge_of_identical_and_disjoint_texts() -> None:
    assert rouge("The cat sat on the mat.", "The cat sat on the mat.") == pytest.approx((1.0, 1.0, 1.0))
    assert rouge("alpha beta", "gamma delta") == (0.0, 0.0, 0.0)
    assert rouge("", "gamma delta") == (0.0, 0.0, 0.0)


def test_rouge_by_hand() -> None:
    r1, r2, rl = rouge("the cat sat", "the cat ran")
    # Unigrams: 2 of 3 shared (the, cat): P = R = F = 2/3.
    assert r1 == pytest.approx(2 / 3)
    # Bigrams {the cat, cat sat} vs {the cat, cat ran}: 1 of 2 shared: F = 1/2.
    assert r2 == pytest.approx(1 / 2)
    # Longest common subsequence "the cat": 2 of 3 tokens: F = 2/3.
    assert rl == pytest.approx(2 / 3)


def test_rouge_stems_words() -> None:
    # Porter stems: cats -> cat, running -> run, runs -> run.
    assert rouge("cats running", "cat runs") == pytest.approx((1.0, 1.0, 1.0))


def test_classification_scores_by_hand() -> None:
    gold = [["pos"], ["pos"], ["neg"], ["neg"], ["neu"], ["neu"]]
    predicted = [["pos"], ["neg"], ["neg"], ["neg"], ["pos"], ["neu"]]
    scores = classification_scores(gold, predicted, ["neu", "pos", "neg"])
    # Items 0, 2, 3 and 5 are right: accuracy 4/6.
    assert scores.accuracy == pytest.approx(4 / 6)
    # pos: assigned to items 0 and 4, right on 0; 2 gold -> P = 1/2, R = 1/2, F1 = 1/2.
    # neg: assigned to items 1, 2, 3, right on 2 and 3; 2 gold -> P = 2/3, R = 1, F1 = (4/3) / (5/3) = 0.8.
    # neu: assigned to item 5, right; 2 gold -> P = 1, R = 1/2, F1 = 1 / (3/2) = 2/3.
    assert scores.per_label == [
        LabelScore("neu", 1.0, 0.5, pytest.approx(2 / 3), 2),
        LabelScore("pos", 0.5, 0.5, 0.5, 2),
        LabelScore("neg", pytest.approx(2 / 3), 1.0, pytest.approx(0.8), 2),
    ]
    # Macro F1 = (2/3 + 1/2 + 4/5) / 3 = (20/30 + 15/30 + 24/30) / 3 = 59/90.
    assert scores.macro_f1 == pytest.approx(59 / 90)


def test_multi_label_accuracy_compares_label_sets() -> None:
    gold = [["a", "b"], ["a"], ["b", "c"], ["c", "c"]]
    predicted = [["b", "a"], ["a", "c"], ["b"], ["c"]]
    scores = classification_scores(gold, predicted, ["a", "b", "c"])
    # Item 0: {a, b} == {b, a}; item 1: {a} != {a, c}; item 2: {b, c} != {b}; item 3: {c} == {c}: 2/4.
    assert scores.accuracy == 0.5
    # a: gold on 0, 1; assigned on 0, 1 -> P = R = F1 = 1.
    # b: gold on 0, 2; assigned on 0, 2 -> 1.
    # c: gold on 2, 3 (once per item); assigned on 1, 3; right on 3 -> P = 1/2, R = 1/2, F1 = 1/2.
    assert scores.per_label == [
        LabelScore("a", 1.0, 1.0, 1.0, 2),
        LabelScore("b", 1.0, 1.0, 1.0, 2),
        LabelScore("c", 0.5, 0.5, 0.5, 2),
    ]
    assert scores.macro_f1 == pytest.approx(2.5 / 3)


def test_labels_outside_the_label_set_are_reported_and_unused_labels_do_not_lower_macro_f1() -> None:
    gold = [["a"], ["q"], ["b"]]
    predicted = [["p"], ["a"], ["b"]]
    scores = classification_scores(gold, predicted, ["a", "b", "c"])
    # Order: the label set, then p (item 0's prediction) and q (item 1's gold), as first seen.
    assert [s.label for s in scores.per_label] == ["a", "b", "c", "p", "q"]
    # a: assigned on 1 (wrong), gold on 0 -> P = 0, R = 0, F1 = 0. b: 1. c: never occurs -> zeros, support 0.
    # p: assigned once, never gold -> 0. q: gold once, never assigned -> 0, support 1.
    assert scores.per_label[2] == LabelScore("c", 0.0, 0.0, 0.0, 0)
    assert scores.per_label[4] == LabelScore("q", 0.0, 0.0, 0.0, 1)
    # Macro F1 over a, b, p, q (c occurs nowhere): (0 + 1 + 0 + 0) / 4.
    assert scores.macro_f1 == pytest.approx(0.25)
    assert scores.accuracy == pytest.approx(1 / 3)


def test_empty_predictions_and_no_items() -> None:
    scores = classification_scores([["a"], ["b"]], [[], ["b"]], ["a", "b"])
    # An item with no predicted label is wrong; a: never assigned -> P = 0, R = 0.
    assert scores.accuracy == 0.5
    assert scores.per_label[0] == LabelScore("a", 0.0, 0.0, 0.0, 1)
    assert scores.macro_f1 == 0.5

    empty = classification_scores([], [], ["a", "b"])
    assert (empty.accuracy, empty.macro_f1) == (0.0, 0.0)
    assert empty.per_label == [LabelScore("a", 0.0, 0.0, 0.0, 0), LabelScore("b", 0.0, 0.0, 0.0, 0)]


def test_classification_scores_need_one_prediction_per_item() -> None:
    with pytest.raises(ValueError, match="2 gold items but 1 predictions"):
        classification_scores([["a"], ["b"]], [["a"]], ["a", "b"])


@pytest.mark.parametrize("q", [0, 12.5, 50, 90, 95, 99, 100])
def test_percentile_matches_numpy(q: float) -> None:
    values = [0.31, 0.02, 1.7, 0.5, 0.5, 0.08, 2.25, 0.9, 0.13, 0.66, 1.01]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([4.0], q) == 4.0


def test_percentile_by_hand_and_edge_cases() -> None:
    # Sorted [1, 2, 3, 4]: the 95th percentile sits at rank 0.95 * 3 = 2.85, between 3 and 4: 3 + 0.85 = 3.85.
    assert percentile([4.0, 1.0, 3.0, 2.0], 95) == pytest.approx(3.85)
    assert percentile([], 95) == 0.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)
