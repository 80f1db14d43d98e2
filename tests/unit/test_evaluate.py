"""Metrics from confusion matrices, summed losses, and the learning-rate schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from bigsft.data.batching import Batch
from bigsft.evaluate import classification_metrics, evaluate, summed_loss
from bigsft.optim import lr_factor


def test_classification_metrics_against_hand_computed_values():
    # rows: true class, columns: predicted class
    cm = torch.tensor([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
    m = classification_metrics(cm)
    precision = [5 / 7, 3 / 4, 4 / 5]
    recall = [5 / 6, 3 / 6, 4 / 4]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall)]
    assert m["accuracy"] == pytest.approx(12 / 16)
    assert m["precision"] == pytest.approx(sum(precision) / 3)
    assert m["recall"] == pytest.approx(sum(recall) / 3)
    assert m["f1"] == pytest.approx(sum(f1) / 3)


def test_never_predicted_and_absent_classes():
    cm = torch.tensor([[3, 0, 0], [1, 0, 0], [0, 0, 0]])  # class 1 never predicted, class 2 absent
    m = classification_metrics(cm)
    assert m["precision"] == pytest.approx((3 / 4 + 0) / 2)
    assert m["recall"] == pytest.approx((1 + 0) / 2)


class Echo(torch.nn.Module):
    """Logits are a fixed function of the input ids, so losses can be checked by hand."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        logits = torch.nn.functional.one_hot(input_ids % self.vocab, self.vocab).float() * 3.0
        return type("Out", (), {"logits": logits})()


def test_summed_loss_ignores_padding_targets():
    batch = Batch({"input_ids": torch.tensor([[1, 2, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])},
                  torch.tensor([[1, 2, -100]]), 2, 2)
    loss, _ = summed_loss(Echo(4), batch, task="causal_lm")
    per_token = -torch.log_softmax(torch.tensor([3.0, 0, 0, 0]), 0)[0]
    assert loss.item() == pytest.approx(2 * per_token.item(), rel=1e-6)


def test_evaluate_single_process_classification():
    batch = Batch({"input_ids": torch.tensor([[0], [1], [1]]), "attention_mask": torch.ones(3, 1, dtype=torch.long)},
                  torch.tensor([0, 1, 0]), 3, 3)

    def model(input_ids, attention_mask=None):
        return type("Out", (), {"logits": torch.nn.functional.one_hot(input_ids[:, 0], 2).float()})()

    m = evaluate(model, [("dev", [batch])], task="sequence_classification", num_labels=2, device="cpu", dummy=batch)
    assert m["eval/accuracy"] == pytest.approx(2 / 3) and m["eval/examples"] == 3
    report = {}
    m = evaluate(model, [("dev", [batch])], task="sequence_classification", num_labels=2, device="cpu", dummy=batch, label_names=["neg", "pos"],
                 report=report)
    # predicted [0, 1, 1] for true [0, 1, 0]: neg precision 1, recall 1/2; pos precision 1/2, recall 1
    assert m["eval/f1/neg"] == pytest.approx(2 / 3) and m["eval/f1/pos"] == pytest.approx(2 / 3)
    assert report["confusion"] == [[1, 1], [0, 1]] and report["labels"] == ["neg", "pos"]
    assert report["classes"]["neg"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert report["classes"]["pos"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert m["eval/f1"] == pytest.approx((m["eval/f1/neg"] + m["eval/f1/pos"]) / 2)
    assert {k[len("eval/dev/"):]: v for k, v in m.items() if k.startswith("eval/dev/")} == {
        k[len("eval/"):]: v for k, v in m.items() if k.count("/") == 1}


def test_each_eval_set_has_its_own_metrics_and_the_aggregate_counts_every_example_once():
    def model(input_ids, attention_mask=None):
        return type("Out", (), {"logits": torch.nn.functional.one_hot(input_ids[:, 0], 2).float()})()

    def batch(ids, labels):
        return Batch({"input_ids": torch.tensor(ids).view(-1, 1), "attention_mask": torch.ones(len(ids), 1, dtype=torch.long)},
                     torch.tensor(labels), len(ids), len(ids))

    a = [batch([0, 1], [0, 1]), batch([1], [0])]  # 2 of 3 right
    b = [batch([0, 0, 1, 1], [1, 1, 1, 1])]  # 2 of 4 right
    kw = {"task": "sequence_classification", "num_labels": 2, "device": "cpu", "dummy": a[0]}
    both = evaluate(model, [("a", a), ("b", b)], **kw)
    alone_a, alone_b = evaluate(model, [("a", a)], **kw), evaluate(model, [("b", b)], **kw)
    assert {k: v for k, v in both.items() if k.startswith("eval/a/")} == {k: v for k, v in alone_a.items() if k.startswith("eval/a/")}
    assert both["eval/b/accuracy"] == alone_b["eval/accuracy"] == 0.5
    assert both["eval/a/accuracy"] == pytest.approx(2 / 3) and both["eval/accuracy"] == pytest.approx(4 / 7)
    assert both["eval/examples"] == 7 and both["eval/b/examples"] == 4
    n_a, n_b = alone_a["eval/examples"], alone_b["eval/examples"]
    assert both["eval/loss"] == pytest.approx((alone_a["eval/loss"] * n_a + alone_b["eval/loss"] * n_b) / (n_a + n_b))


def test_causal_token_accuracy_counts_trained_tokens_only():
    # Echo predicts token t at position t: right where the target repeats the input, whatever the padding.
    batch = Batch({"input_ids": torch.tensor([[1, 2, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])},
                  torch.tensor([[1, 3, 3, -100]]), 3, 3)
    m = evaluate(Echo(4), [("x", [batch])], task="causal_lm", num_labels=None, device="cpu", dummy=batch)
    assert m["eval/token_accuracy"] == pytest.approx(2 / 3) and m["eval/x/token_accuracy"] == pytest.approx(2 / 3)
    assert m["eval/tokens"] == 3


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays_to_min(schedule):
    f = [lr_factor(s, total=20, warmup=4, schedule=schedule, min_ratio=0.1) for s in range(20)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0)
    if schedule == "constant":
        assert f[-1] == 1.0
    else:
        assert all(a >= b for a, b in itertools.pairwise(f[4:]))
        progress = 15 / 16  # last step: 15 of the 16 decay steps done
        decayed = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        assert f[-1] == pytest.approx(0.1 + 0.9 * decayed)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_head_on_trained_positions_only_changes_nothing_but_the_work(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    from bigsft.model import trained_positions_head

    import tiny

    raw = dict(tiny.LLAMA if family == "llama" else tiny.GPT2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(raw.pop("model_type"), vocab_size=400, **raw))
    ids = torch.randint(0, 400, (3, 20))
    targets = ids.clone()
    targets[:, :7] = -100  # the prompt
    targets[2] = -100  # a row with nothing to train
    batch = Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, targets, int((targets != -100).sum()), 60)

    def loss_and_grads(head):
        model.zero_grad()
        loss, logits = summed_loss(model, batch, task="causal_lm", head=head)
        loss.backward()
        return loss.item(), logits.shape, [p.grad.clone() for p in model.parameters()]

    full, full_shape, full_grads = loss_and_grads(None)
    head = trained_positions_head(model, model.config)
    picked, picked_shape, picked_grads = loss_and_grads(head)
    assert full_shape == (3, 20, 400) and picked_shape == (batch.num_targets, 400)
    assert picked == pytest.approx(full, rel=1e-6)
    for a, b in zip(full_grads, picked_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert model(input_ids=ids).logits.shape == (3, 20, 400)  # outside training the model is stock
    nothing = Batch(batch.inputs, torch.full_like(targets, -100), 0, 60)
    assert summed_loss(model, nothing, task="causal_lm", head=head)[0].item() == 0.0


def test_head_selection_only_for_families_whose_logits_are_the_head():
    from types import SimpleNamespace

    from bigsft.model import trained_positions_head

    model = SimpleNamespace(get_output_embeddings=lambda: torch.nn.Linear(4, 8))
    assert trained_positions_head(model, SimpleNamespace(model_type="llama")) is not None
    assert trained_positions_head(model, SimpleNamespace(model_type="gemma2")) is None  # soft-capped logits
    assert trained_positions_head(model, SimpleNamespace(model_type="qwen2", logit_scale=0.5)) is None


def test_evaluate_refuses_a_head_that_cannot_score_the_data():
    from types import SimpleNamespace

    from bigsft.assess import _head_problems

    classifier = SimpleNamespace(architectures=["BertForSequenceClassification"], id2label={0: "neg", 1: "pos"})
    assert _head_problems(classifier, "sequence_classification", {0: "neg", 1: "pos"}) == []
    assert "is a sequence classifier" in _head_problems(classifier, "causal_lm", None)[0]
    assert "classifies 2 classes, the data 3" in _head_problems(classifier, "sequence_classification",
                                                                {0: "a", 1: "b", 2: "c"})[0]
    assert "are not the data's" in _head_problems(classifier, "sequence_classification", {0: "pos", 1: "neg"})[0]
    unnamed = SimpleNamespace(architectures=["BertForSequenceClassification"], id2label={0: "LABEL_0", 1: "LABEL_1"})
    assert _head_problems(unnamed, "sequence_classification", {0: "neg", 1: "pos"}) == []
    base = SimpleNamespace(architectures=["BertModel"], id2label={0: "LABEL_0", 1: "LABEL_1"})
    assert _head_problems(base, "sequence_classification", {0: "a", 1: "b", 2: "c"}) == []  # a new head


def test_eval_set_names_come_from_names_or_files_and_never_read_as_metrics():
    from bigsft.config import DataConfig, DataSource
    from bigsft.data import eval_set_names

    def source(path, **kw):
        return DataSource(path=path, format="alpaca", **kw)

    data = DataConfig(train=[source("t.jsonl")], validation=0.1,
                      eval=[source("data/dev.jsonl"), source("other/dev.json.gz"), source("x.jsonl", name="loss"),
                            source("y.jsonl", name="validation")])
    assert eval_set_names(data) == ["dev", "dev_1", "loss_set", "validation", "validation_2"]


def test_tagging_metrics_are_seqevals_entity_level_scores():
    """Entity precision / recall / F1 and the per-type report equal seqeval's on fixed predictions, including
    its CoNLL chunking of an I- tag that starts an entity; token accuracy counts tagged words."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    names = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "I-ORG", "O"], ["B-LOC", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "I-ORG", "I-ORG", "I-ORG", "B-PER"], ["B-LOC", "O"]]
    ids = {n: i for i, n in enumerate(names)}
    longest = max(map(len, true)) + 2  # a special token before each sentence, padding after

    def rows(seqs):
        out = torch.full((len(seqs), longest), -100, dtype=torch.long)
        for i, seq in enumerate(seqs):
            out[i, 1 : 1 + len(seq)] = torch.tensor([ids[t] for t in seq])
        return out

    targets, predicted = rows(true), rows(pred)

    def model(input_ids, attention_mask=None):  # logits whose argmax is the scripted prediction
        return type("Out", (), {"logits": torch.nn.functional.one_hot(predicted.clamp(min=0), len(names)).float()})()

    batch = Batch({"input_ids": torch.zeros_like(targets), "attention_mask": torch.ones_like(targets)}, targets,
                  int((targets != -100).sum()), targets.numel())
    report = {}
    m = evaluate(model, [("dev", [batch])], task="token_classification", num_labels=len(names), device="cpu",
                 dummy=batch, label_names=names, report=report)
    assert m["eval/precision"] == pytest.approx(precision_score(true, pred))
    assert m["eval/recall"] == pytest.approx(recall_score(true, pred))
    assert m["eval/f1"] == pytest.approx(f1_score(true, pred))
    reference = classification_report(true, pred, output_dict=True)
    for kind in ("LOC", "ORG", "PER"):
        row = reference[kind]
        assert report["classes"][kind] == pytest.approx(
            {"precision": row["precision"], "recall": row["recall"], "f1": row["f1-score"], "support": row["support"]})
        assert m[f"eval/f1/{kind}"] == pytest.approx(row["f1-score"])
    words = sum(map(len, true))
    agree = sum(a == b for t, p in zip(true, pred) for a, b in zip(t, p))
    assert m["eval/accuracy"] == pytest.approx(agree / words) and m["eval/tokens"] == words
    assert report["labels"] == names and sum(map(sum, report["confusion"])) == words
