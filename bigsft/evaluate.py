"""Loss and metrics, summed locally and reduced across ranks so that every example counts exactly once.

`summed_loss` returns the *sum* of per-target cross-entropies: training divides by the trained-token
count of the whole global batch, evaluation by the count of the whole eval set, so neither depends
on how samples fell into micro-batches or ranks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bigsft import dist
from bigsft.data.batching import Batch
from bigsft.data.tokenize import IGNORE
from bigsft.model import TrainedPositionsHead
from bigsft.qa import Answers

PER_TOKEN_TASKS = ("causal_lm", "token_classification", "seq2seq_lm")
"""Tasks whose targets are per token ([B, T], -100 where no loss), not one per example."""
GENERATIVE_TASKS = ("causal_lm", "seq2seq_lm")


def summed_loss(model: Callable, batch: Batch, *, task: str,
                head: TrainedPositionsHead | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropies over the batch's targets in fp32, logits). With `head` (a causal LM), the
    LM head runs only where a target is, and the logits are [trained tokens, vocab]; with a tiled head
    (model.tiled_loss) the second item is the argmax token ids instead in eval, and None in training."""
    extra = {"use_cache": False} if task in GENERATIVE_TASKS else {}
    if head is not None:
        mask = batch.targets != IGNORE
        with head.selecting(mask):
            logits = model(**batch.inputs, **extra).logits
        if head.tile_tokens:  # no whole logits: the predictions (token ids) in their place, for eval
            loss, predicted = head.tiled_loss(batch.targets[mask])
            # The model's ([0, vocab]) logits stay on the loss's graph, added last so that their gradient comes
            # first: DeepSpeed starts its backward bookkeeping (the accumulation boundary of ZeRO's offloaded
            # gradients) from a hook on the forward's outputs. Without it, ZeRO-2 with optimizer offload mixed
            # up accumulated gradients (grad norm 1.49 against 2.02 at step 1).
            return loss + logits.sum() * 0.0, predicted
        return F.cross_entropy(logits.float(), batch.targets[mask], reduction="sum"), logits
    if task == "question_answering":
        # A window's loss: the mean of its start and end cross-entropies over its own tokens (padding left out,
        # so that the loss does not depend on which windows share a batch).
        out = model(**batch.inputs)
        padding = batch.inputs["attention_mask"] == 0
        start, end = (logits.float().masked_fill(padding, float("-inf")) for logits in (out.start_logits, out.end_logits))
        loss = (F.cross_entropy(start, batch.targets[:, 0], reduction="sum")
                + F.cross_entropy(end, batch.targets[:, 1], reduction="sum")) / 2
        return loss, torch.stack([out.start_logits, out.end_logits], dim=-1)
    logits = model(**batch.inputs, **extra).logits
    if task in PER_TOKEN_TASKS:
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE,
                               reduction="sum")
    else:
        loss = F.cross_entropy(logits.float(), batch.targets, reduction="sum")
    return loss, logits


def _per_class(confusion: torch.Tensor):
    cm = confusion.double()
    tp = cm.diag()
    predicted, actual = cm.sum(0), cm.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    return tp, precision, recall, f1, actual, (predicted + actual) > 0


def classification_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro precision / recall / F1 from a [true, predicted] count matrix.

    Macro averages run over the classes that occur in the labels or the predictions (as
    scikit-learn does); a class never predicted has precision 0, never present recall 0.
    """
    tp, precision, recall, f1, _, present = _per_class(confusion)
    total = confusion.sum()
    classes = present.sum().clamp(min=1)
    return {
        "accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "precision": float(precision[present].sum() / classes),
        "recall": float(recall[present].sum() / classes),
        "f1": float(f1[present].sum() / classes),
    }


def class_report(confusion: torch.Tensor, names: list[str]) -> dict:
    """Per class (in id order): precision, recall, F1 and support (true examples); and the confusion
    matrix, rows the true classes and columns the predicted ones."""
    _, precision, recall, f1, support, _ = _per_class(confusion)
    classes = {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                      "support": int(support[i])} for i, name in enumerate(names)}
    return {"classes": classes, "confusion": confusion.tolist(), "labels": list(names)}


RESERVED_SET_NAMES = frozenset({"loss", "perplexity", "tokens", "token_accuracy", "accuracy", "precision", "recall",
                                "f1", "examples", "classes", "generate"})
"""Names an eval set cannot take: `eval/<set>/...` would read as a metric's own key."""


TASK_METRICS = {
    "sequence_classification": ["loss", "accuracy", "precision", "recall", "f1", "examples"],
    "token_classification": ["loss", "accuracy", "precision", "recall", "f1", "tokens"],
    "causal_lm": ["loss", "perplexity", "tokens", "token_accuracy"],
    "question_answering": ["loss", "exact_match", "f1", "has_answer_f1", "examples"],
    "seq2seq_lm": ["loss", "perplexity", "tokens", "token_accuracy"],
}
"""What an eval logs per task (eval/<metric>): classifiers' precision / recall / F1 are macro over classes,
a tagger's are entity-level (CoNLL, micro over entities) and its accuracy is over tagged words."""


def metric_names(task: str, sets: Sequence[str] = (), *, pipeline: bool = False) -> list[str]:
    """The keys an eval logs for a task: the aggregate over every eval set, then each set's own
    (`eval/<set>/<metric>`). Classifiers also log `eval/f1/<class>` for each class, taggers for each
    entity type."""
    metrics = TASK_METRICS.get(task, ["loss"])
    if pipeline:  # the pipeline's last stage computes the loss, not the predictions
        metrics = [m for m in metrics if m != "token_accuracy"]
    return [f"eval/{m}" for m in metrics] + [f"eval/{s}/{m}" for s in sets for m in metrics]


def entity_report(entities: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """Per entity type: precision, recall, F1 and support (true entities), from [true, predicted, correct]
    counts, as seqeval's classification_report computes them."""
    out = {}
    for kind, (true, predicted, correct) in sorted(entities.items()):
        precision = correct / predicted if predicted else 0.0
        recall = correct / true if true else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[kind] = {"precision": precision, "recall": recall, "f1": f1, "support": true}
    return out


def entity_counts(true_tags: list[str], predicted_tags: list[str], counts: dict[str, list[int]]) -> None:
    """Adds one sequence's entities (seqeval's chunking, the CoNLL definition) to `counts`: per type
    [true, predicted, correct]."""
    from seqeval.metrics.sequence_labeling import get_entities

    true, predicted = set(get_entities(true_tags)), set(get_entities(predicted_tags))
    for kind, *_ in true | predicted:
        counts.setdefault(kind, [0, 0, 0])
    for chunk in true:
        counts[chunk[0]][0] += 1
    for chunk in predicted:
        counts[chunk[0]][1] += 1
        counts[chunk[0]][2] += chunk in true


def dummy_for_task(task: str, pad_id: int) -> Batch:
    """The no-loss batch a rank runs while others still have eval batches, shaped for the task's model."""
    from bigsft.data.stream import dummy_batch

    return dummy_batch(per_token=task in PER_TOKEN_TASKS, pad_id=pad_id, span=task == "question_answering",
                       decoder=task == "seq2seq_lm")


class EvalInterrupted(Exception):
    """A stop signal reached some rank during an eval: every rank left it at the same batch."""


@dataclass
class Tally:
    """One eval set's sums on this rank (or, reduced, over the world)."""

    loss: float = 0.0
    targets: int = 0
    """Target tokens (causal LM) or examples (classifier)."""
    correct: int = 0
    """Targets whose argmax prediction is right (tokens for a causal LM)."""
    confusion: torch.Tensor | None = None
    """[true, predicted] counts of classes (classifiers) or tags (taggers)."""
    entities: dict[str, list[int]] | None = None
    """Taggers: per entity type, [true, predicted, correct] entity counts."""
    f1_sum: float = 0.0
    """Extractive QA: the sum of the examples' F1 (`correct` holds their exact matches)."""
    examples: int = 0
    """Extractive QA: questions (`targets` counts their windows, the loss's unit)."""
    answerable_f1_sum: float = 0.0
    answerable: int = 0
    """Extractive QA: questions with an answer, and their F1 (SQuAD 2.0's HasAns_f1)."""

    def add(self, other: Tally) -> Tally:
        confusion = None if self.confusion is None else self.confusion + other.confusion
        entities = None
        if self.entities is not None:
            entities = {k: [a + b for a, b in zip(self.entities.get(k, [0, 0, 0]), other.entities.get(k, [0, 0, 0]))]
                        for k in {*self.entities, *other.entities}}
        return Tally(self.loss + other.loss, self.targets + other.targets, self.correct + other.correct, confusion,
                     entities, self.f1_sum + other.f1_sum, self.examples + other.examples,
                     self.answerable_f1_sum + other.answerable_f1_sum, self.answerable + other.answerable)

    def metrics(self, prefix: str) -> dict[str, float]:
        loss = self.loss / max(self.targets, 1)
        if self.examples:
            out = {"loss": loss, "exact_match": self.correct / self.examples, "f1": self.f1_sum / self.examples,
                   "has_answer_f1": self.answerable_f1_sum / max(self.answerable, 1), "examples": self.examples}
        elif self.entities is not None:
            true, predicted, correct = (sum(c[i] for c in self.entities.values()) for i in range(3))
            precision = correct / predicted if predicted else 0.0
            recall = correct / true if true else 0.0
            out = {"loss": loss, "accuracy": self.correct / max(self.targets, 1), "precision": precision,
                   "recall": recall, "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
                   "tokens": int(self.targets)}
        elif self.confusion is not None:
            out = {"loss": loss, **classification_metrics(self.confusion), "examples": int(self.targets)}
        else:
            out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(self.targets),
                   "token_accuracy": self.correct / max(self.targets, 1)}
        return {f"{prefix}{k}": v for k, v in out.items()}


def reduce_tallies(tallies: list[Tally]) -> list[Tally]:
    """The world's sums of each set, from every rank's own (one collective for the counts, one for the
    confusion matrices)."""
    fields = ("loss", "targets", "correct", "f1_sum", "examples", "answerable_f1_sum", "answerable")
    flat = dist.all_reduce_sum([getattr(t, f) for t in tallies for f in fields])
    confusion = None
    if tallies and tallies[0].confusion is not None:
        confusion = torch.stack([t.confusion for t in tallies])
        dist.all_reduce_tensor(confusion)
    entities = [None] * len(tallies)
    if tallies and tallies[0].entities is not None:  # entity types are not known in advance: gathered
        gathered = dist.all_gather_object([t.entities for t in tallies])
        entities = [functools.reduce(lambda a, b: Tally(entities=a).add(Tally(entities=b)).entities,
                                     [rank[i] for rank in gathered]) for i in range(len(tallies))]
    counts = [dict(zip(fields, flat[len(fields) * i : len(fields) * (i + 1)])) for i in range(len(tallies))]
    for c in counts:
        for f in ("targets", "correct", "examples", "answerable"):
            c[f] = round(c[f])
    return [Tally(**c, confusion=None if confusion is None else confusion[i], entities=entities[i])
            for i, c in enumerate(counts)]


def set_metrics(names: Sequence[str], tallies: list[Tally], *, label_names: list[str] | None = None,
                report: dict | None = None) -> dict[str, float]:
    """The aggregate keys (`eval/loss`, ... over every set), then each set's (`eval/<set>/loss`, ...). A
    classifier's aggregate also has each class's F1 (`eval/f1/<class>`); `report`, when given, receives
    the aggregate per-class report and confusion matrix (`class_report`)."""
    total = functools.reduce(Tally.add, tallies)
    out = total.metrics("eval/")
    if total.entities is not None:
        n = total.confusion.shape[0]
        per_type = entity_report(total.entities)
        out.update({f"eval/f1/{kind}": row["f1"] for kind, row in per_type.items()})
        if report is not None:
            report.update({"classes": per_type, "confusion": total.confusion.tolist(),
                           "labels": list(label_names or [str(i) for i in range(n)])})
    elif total.confusion is not None:
        n = total.confusion.shape[0]
        per_class = class_report(total.confusion, label_names or [str(i) for i in range(n)])
        out.update({f"eval/f1/{name}": row["f1"] for name, row in per_class["classes"].items()})
        if report is not None:
            report.update(per_class)
    for name, tally in zip(names, tallies, strict=True):
        out.update(tally.metrics(f"eval/{name}/"))
    return out


@torch.no_grad()
def evaluate(model: Callable, sets: Sequence[tuple[str, Iterable[Batch]]], *, task: str, num_labels: int | None,
             device: torch.device | str, dummy: Batch, head: TrainedPositionsHead | None = None,
             stop_requested: Callable[[], bool] | None = None, label_names: list[str] | None = None,
             report: dict | None = None, max_answer_length: int = 30) -> dict[str, float]:
    """Metrics of each named eval set and of all of them, over all ranks' batches (`set_metrics`). Ranks
    run the same number of forward passes (ZeRO-3 gathers parameters collectively): a rank out of a set's
    batches runs `dummy`, which counts for nothing, until every rank is done with the set.
    `stop_requested` (a stop signal) is polled before every batch, in the same collective: an eval
    longer than a signal's lead time must not cost the save."""
    tallies = [_tally(model, batches, task=task, num_labels=num_labels, device=device, dummy=dummy, head=head,
                      stop_requested=stop_requested, label_names=label_names, max_answer_length=max_answer_length)
               for _, batches in sets]
    return set_metrics([name for name, _ in sets], reduce_tallies(tallies), label_names=label_names, report=report)


def _tally(model: Callable, batches: Iterable[Batch], *, task: str, num_labels: int | None,
           device: torch.device | str, dummy: Batch, head: TrainedPositionsHead | None,
           stop_requested: Callable[[], bool] | None, label_names: list[str] | None,
           max_answer_length: int = 30) -> Tally:
    tally = Tally(confusion=torch.zeros((num_labels, num_labels), dtype=torch.long) if num_labels else None,
                  entities={} if task == "token_classification" else None)
    names = label_names or [str(i) for i in range(num_labels or 0)]
    answers = Answers() if task == "question_answering" else None
    loss_sum = torch.zeros((), dtype=torch.float64)
    it = iter(batches)
    while True:
        batch = next(it, None)
        stop = 2 if stop_requested is not None and stop_requested() else 0
        flags = dist.all_reduce_max(int(batch is not None) | stop)  # >= 2: some rank was asked to stop
        if flags >= 2:
            raise EvalInterrupted
        if flags == 0:
            break
        real = batch is not None
        loss, logits = summed_loss(model, (batch if real else dummy).to(device), task=task, head=head)
        if not real:
            continue
        loss_sum += loss.double().cpu()
        tally.targets += batch.num_targets
        if answers is not None:
            for meta, window in zip(batch.meta, logits.detach().cpu()):
                answers.add(meta, window[:, 0], window[:, 1], max_answer_length)
            continue
        pred = (logits if logits.dtype == torch.long else logits.argmax(-1)).cpu()  # a tiled head predicted
        targets = batch.targets.cpu()
        if head is not None:  # the logits are the trained positions' only
            tally.correct += int((pred == targets[targets != IGNORE]).sum())
            continue
        tagged = targets != IGNORE
        tally.correct += int((pred == targets)[tagged].sum())
        if tally.confusion is not None:
            idx = targets[tagged] * num_labels + pred[tagged]
            tally.confusion += torch.bincount(idx, minlength=num_labels * num_labels).view(num_labels, num_labels)
        if tally.entities is not None:
            for row_true, row_pred, row_tagged in zip(targets, pred, tagged):
                entity_counts([names[i] for i in row_true[row_tagged]], [names[i] for i in row_pred[row_tagged]],
                              tally.entities)
    tally.loss = float(loss_sum)
    if answers is not None:
        exact, tally.f1_sum, tally.examples, tally.answerable_f1_sum, tally.answerable = answers.scores()
        tally.correct = round(exact)
    return tally
