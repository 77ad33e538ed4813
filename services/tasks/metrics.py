"""Evaluate's metrics: SQuAD exact match and token F1, ROUGE, classification accuracy and per-label F1, percentiles.

Pure functions of strings and numbers, so the evaluator stays a thin loop and every number in EvalMetrics can be
checked by hand. Definitions follow the comments of EvalMetrics and LabelMetrics in protos/genloom/v1/tasks.proto.
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# SQuAD v1.1 strips ASCII punctuation only; keeping to it keeps our numbers comparable with published ones.
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def squad_normalize(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD v1.1)."""
    lowered = text.lower()
    no_punctuation = "".join(ch for ch in lowered if ch not in _PUNCTUATION)
    no_articles = _ARTICLES.sub(" ", no_punctuation)
    return " ".join(no_articles.split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals any normalized gold answer, else 0.0 (0.0 with no golds)."""
    normalized = squad_normalize(prediction)
    return 1.0 if any(normalized == squad_normalize(gold) for gold in golds) else 0.0


def _token_f1(prediction_tokens: list[str], gold_tokens: list[str]) -> float:
    if not prediction_tokens or not gold_tokens:
        # An empty answer is right only against an empty gold answer.
        return 1.0 if prediction_tokens == gold_tokens else 0.0
    shared = sum((Counter(prediction_tokens) & Counter(gold_tokens)).values())
    if shared == 0:
        return 0.0
    precision = shared / len(prediction_tokens)
    recall = shared / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    """SQuAD token F1 of the normalized prediction against the best-matching gold answer (0.0 with no golds)."""
    prediction_tokens = squad_normalize(prediction).split()
    return max((_token_f1(prediction_tokens, squad_normalize(gold).split()) for gold in golds), default=0.0)


def answer_scores(
    prediction: str, predicted_unanswerable: bool, golds: Sequence[str], gold_unanswerable: bool
) -> tuple[float, float]:
    """(exact match, token F1) of one Answer item, with unanswerable questions scored all or nothing."""
    if gold_unanswerable:
        return (1.0, 1.0) if predicted_unanswerable else (0.0, 0.0)
    if predicted_unanswerable:
        return 0.0, 0.0
    return exact_match(prediction, golds), token_f1(prediction, golds)


@functools.cache
def _rouge_scorer() -> Any:
    # Imported here: rouge_score pulls in nltk, which only Evaluate on Summarize needs. Building the scorer once
    # also builds its stemmer once.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge(prediction: str, reference: str) -> tuple[float, float, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures of a summary against its reference (rouge-score, stemming on).

    rouge-score's tokenizer keeps only ASCII letters and digits, so text in other scripts scores 0.
    """
    scores = _rouge_scorer().score(reference, prediction)  # rouge-score takes the reference first
    return scores["rouge1"].fmeasure, scores["rouge2"].fmeasure, scores["rougeL"].fmeasure


@dataclass(frozen=True)
class LabelScore:
    """One label's metrics (LabelMetrics): 0 wherever a denominator is 0."""

    label: str
    precision: float
    recall: float
    f1: float
    support: int  # items whose gold labels include this label


@dataclass(frozen=True)
class ClassificationScores:
    accuracy: float  # fraction of items whose predicted label set equals the gold set
    macro_f1: float  # mean F1 over the labels occurring in gold or predictions
    per_label: list[LabelScore]


def classification_scores(
    gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]], labels: Sequence[str]
) -> ClassificationScores:
    """Accuracy, macro F1 and per-label metrics of single- or multi-label predictions (one label list per item).

    per_label follows `labels`, then any other label seen in gold or predictions in first-seen order, so labels
    a model invents are visible. Labels in `labels` that occur nowhere are listed with zeros but do not pull
    macro F1 down.
    """
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold items but {len(predicted)} predictions")
    gold_sets = [set(item) for item in gold]
    predicted_sets = [set(item) for item in predicted]

    order = dict.fromkeys(labels)
    for gold_item, predicted_item in zip(gold, predicted, strict=True):
        for label in (*gold_item, *predicted_item):
            order.setdefault(label)

    support: Counter[str] = Counter()
    assigned: Counter[str] = Counter()
    correct: Counter[str] = Counter()
    for gold_set, predicted_set in zip(gold_sets, predicted_sets, strict=True):
        support.update(gold_set)
        assigned.update(predicted_set)
        correct.update(gold_set & predicted_set)

    per_label = []
    for label in order:
        precision = correct[label] / assigned[label] if assigned[label] else 0.0
        recall = correct[label] / support[label] if support[label] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label.append(LabelScore(label, precision, recall, f1, support[label]))

    occurring = [score.f1 for score in per_label if support[score.label] or assigned[score.label]]
    macro_f1 = sum(occurring) / len(occurring) if occurring else 0.0
    matches = sum(g == p for g, p in zip(gold_sets, predicted_sets, strict=True))
    accuracy = matches / len(gold_sets) if gold_sets else 0.0
    return ClassificationScores(accuracy=accuracy, macro_f1=macro_f1, per_label=per_label)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (q from 0 to 100), interpolated linearly between the closest ranks as numpy's default
    does; 0.0 for no values (a configuration whose items all failed has no latencies)."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be between 0 and 100, got {q}")
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (rank - low) * (ordered[high] - ordered[low])
