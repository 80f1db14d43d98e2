"""Loss and metrics, summed locally and reduced across ranks so that every example counts exactly once.

`summed_loss` returns the *sum* of per-target cross-entropies: training divides by the trained-token
count of the whole global batch, evaluation by the count of the whole eval set, so neither depends
on how samples fell into micro-batches or ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from bigsft import dist
from bigsft.data.batching import Batch
from bigsft.data.tokenize import IGNORE
from bigsft.model import TrainedPositionsHead


def summed_loss(model: Callable, batch: Batch, *, causal: bool,
                head: TrainedPositionsHead | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropies over the batch's targets in fp32, logits). With `head` (a causal LM), the
    LM head runs only where a target is, and the logits are [trained tokens, vocab]."""
    if causal and head is not None:
        mask = batch.targets != IGNORE
        with head.selecting(mask):
            logits = model(**batch.inputs, use_cache=False).logits
        return F.cross_entropy(logits.float(), batch.targets[mask], reduction="sum"), logits
    extra = {"use_cache": False} if causal else {}
    logits = model(**batch.inputs, **extra).logits
    if causal:
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


def metric_names(task: str) -> list[str]:
    """The keys an eval logs for a task (classifiers add `eval/f1/<class>` for each class)."""
    if task == "sequence_classification":
        return ["eval/loss", "eval/accuracy", "eval/precision", "eval/recall", "eval/f1", "eval/examples"]
    return ["eval/loss", "eval/perplexity", "eval/tokens"]


class EvalInterrupted(Exception):
    """A stop signal reached some rank during an eval: every rank left it at the same batch."""


@torch.no_grad()
def evaluate(model: Callable, batches: Iterable[Batch], *, causal: bool, num_labels: int | None,
             device: torch.device | str, dummy: Batch, head: TrainedPositionsHead | None = None,
             stop_requested: Callable[[], bool] | None = None, label_names: list[str] | None = None,
             report: dict | None = None) -> dict[str, float]:
    """Metrics over all ranks' batches. Ranks run the same number of forward passes (ZeRO-3 gathers
    parameters collectively): a rank out of batches runs `dummy`, which counts for nothing, until
    every rank is done. `stop_requested` (a stop signal) is polled before every batch, in the same
    collective: an eval longer than a signal's lead time must not cost the save. A classifier's metrics
    include each class's F1 (`eval/f1/<name>`); `report`, when given, receives the per-class report and
    the confusion matrix (`class_report`)."""
    loss_sum = torch.zeros((), dtype=torch.float64)
    count = 0
    confusion = torch.zeros((num_labels, num_labels), dtype=torch.long) if num_labels else None
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
        loss, logits = summed_loss(model, (batch if real else dummy).to(device), causal=causal, head=head)
        if not real:
            continue
        loss_sum += loss.double().cpu()
        count += batch.num_targets
        if confusion is not None:
            pred = logits.argmax(-1).cpu()
            idx = batch.targets.cpu() * num_labels + pred
            confusion += torch.bincount(idx, minlength=num_labels * num_labels).view(num_labels, num_labels)
    total_loss, total_count = dist.all_reduce_sum([float(loss_sum), count])
    out = {"eval/loss": total_loss / max(total_count, 1)}
    if confusion is not None:
        dist.all_reduce_tensor(confusion)
        out.update({f"eval/{k}": v for k, v in classification_metrics(confusion).items()})
        out["eval/examples"] = int(total_count)
        per_class = class_report(confusion, label_names or [str(i) for i in range(num_labels)])
        out.update({f"eval/f1/{name}": row["f1"] for name, row in per_class["classes"].items()})
        if report is not None:
            report.update(per_class)
    else:
        out["eval/perplexity"] = math.exp(min(out["eval/loss"], 50.0))
        out["eval/tokens"] = int(total_count)
    return out
