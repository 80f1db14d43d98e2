"""Extractive question answering: spans from start/end logits, across a context's windows, and their scores.

A context longer than data.max_length is read in overlapping windows (`SampleBuilder._windows`). Each window
proposes its best span inside its own context tokens (end not before start, at most `max_answer_length`
tokens); an example's answer is the best-scoring span over all its windows, or no answer when the lowest
"no answer" score (the first token's start plus end logit) of its windows beats it, as the SQuAD 2.0
reference post-processing decides. All windows of an example sit on one rank (ranks share records, not
windows), so each rank scores whole examples and the sums are exact.

Scores follow the official evaluation scripts. SQuAD (v1.1 and v2.0): answers normalized (lower case,
punctuation and the articles a / an / the removed, whitespace collapsed); exact match, and F1 over the
words both share; the best over the reference answers; an unanswerable question matches only an empty
prediction. CMRC 2018 (Chinese, chosen when the context holds CJK text): text split into characters with
runs of Latin letters or digits kept whole, punctuation removed; F1 from the longest common substring.
"""

from __future__ import annotations

import collections
import re
import string
import unicodedata

import torch

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def window_best(start_logits: torch.Tensor, end_logits: torch.Tensor, offsets: list, context: str,
                max_answer_length: int, candidates: int = 20) -> tuple[float, str, float]:
    """(best span's score, its text, this window's no-answer score) of one window."""
    null = float(start_logits[0] + end_logits[0])
    inside = torch.tensor([o is not None for o in offsets] + [False] * (len(start_logits) - len(offsets)))
    if not inside.any():
        return float("-inf"), "", null
    masked_start = start_logits.masked_fill(~inside, float("-inf"))
    masked_end = end_logits.masked_fill(~inside, float("-inf"))
    k = min(candidates, int(inside.sum()))
    best, text = float("-inf"), ""
    for s in masked_start.topk(k).indices.tolist():
        for e in masked_end.topk(k).indices.tolist():
            if e < s or e - s + 1 > max_answer_length:
                continue
            score = float(masked_start[s] + masked_end[e])
            if score > best:
                best, text = score, context[offsets[s][0] : offsets[e][1]]
    return best, text, null


class Answers:
    """One rank's running best span and no-answer score per example, over the windows seen so far."""

    def __init__(self):
        self.best: dict[str, tuple[float, str]] = {}
        self.null: dict[str, float] = {}
        self.references: dict[str, tuple[list[str], bool]] = {}

    def add(self, meta: dict, start_logits: torch.Tensor, end_logits: torch.Tensor, max_answer_length: int) -> None:
        key = meta["key"]
        score, text, null = window_best(start_logits.float().cpu(), end_logits.float().cpu(), meta["offsets"],
                                        meta["context"], max_answer_length)
        if key not in self.best or score > self.best[key][0]:
            self.best[key] = (score, text)
        self.null[key] = min(null, self.null.get(key, float("inf")))
        self.references[key] = (meta["answers"], bool(_CJK.search(meta["context"])))

    def predictions(self) -> dict[str, str]:
        return {key: "" if self.null[key] > score else text for key, (score, text) in self.best.items()}

    def scores(self) -> tuple[float, float, int, float, int]:
        """(sum of exact matches, sum of F1, examples, sum of F1 over answerable examples, answerable examples)."""
        em = f1 = answerable_f1 = 0.0
        answerable = 0
        for key, prediction in self.predictions().items():
            answers, chinese = self.references[key]
            e, f = (cmrc_scores if chinese else squad_scores)(prediction, answers)
            em += e
            f1 += f
            if answers:
                answerable += 1
                answerable_f1 += f
        return em, f1, len(self.best), answerable_f1, answerable


# -- SQuAD ----------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD evaluation's normalization)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def _squad_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:  # an empty answer (no answer) scores only against another empty one
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, answers: list[str]) -> tuple[float, float]:
    """(exact match, F1) against the best of the reference answers; none: unanswerable."""
    references = answers or [""]
    em = max(float(normalize_answer(prediction) == normalize_answer(a)) for a in references)
    return em, max(_squad_f1(prediction, a) for a in references)


# -- CMRC 2018 ------------------------------------------------------------------------------------------------


def _is_punctuation(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P") or ch in string.punctuation or ch in "，。：？！；、“”‘’《》（）【】—…·"


def cmrc_segments(text: str) -> list[str]:
    """Characters of CJK (and other non-Latin) text, runs of Latin letters and digits whole, no punctuation or
    spaces: the units of the CMRC 2018 evaluation."""
    out, run = [], ""
    for ch in text.lower():
        if ch.isascii() and ch.isalnum():
            run += ch
            continue
        if run:
            out.append(run)
            run = ""
        if not ch.isspace() and not _is_punctuation(ch):
            out.append(ch)
    if run:
        out.append(run)
    return out


def _longest_common_substring(a: list[str], b: list[str]) -> int:
    best = 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b):
            if x == y:
                current[j + 1] = previous[j] + 1
                best = max(best, current[j + 1])
        previous = current
    return best


def cmrc_scores(prediction: str, answers: list[str]) -> tuple[float, float]:
    """(exact match, F1) as the CMRC 2018 evaluation computes them: the best over the reference answers."""
    references = answers or [""]
    pred = cmrc_segments(prediction)
    em = max(float("".join(pred) == "".join(cmrc_segments(a))) for a in references)
    f1 = 0.0
    for answer in references:
        ref = cmrc_segments(answer)
        if not pred or not ref:
            f1 = max(f1, float(pred == ref))
            continue
        common = _longest_common_substring(pred, ref)
        if common:
            precision, recall = common / len(pred), common / len(ref)
            f1 = max(f1, 2 * precision * recall / (precision + recall))
    return em, f1
