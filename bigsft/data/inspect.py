"""`bigsft data inspect CFG [-n N]`: what the model will see, and what the corpus holds.

Shows N processed training samples with the trained tokens highlighted against the masked ones, then
one pass over the training sources: records, samples, tokens, trained tokens, truncated and skipped
counts by reason, a length histogram, and how much of each row is real tokens with padding per batch
versus packing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table
from rich.text import Text

from bigsft.config import RunConfig
from bigsft.data import RunData
from bigsft.data.batching import Packer
from bigsft.data.scan import SplitStats
from bigsft.data.stream import source_names, source_streams
from bigsft.data.tokenize import IGNORE, Sample


@dataclass
class CorpusStats:
    lengths: list[int] = field(default_factory=list)
    trained: int = 0
    per_source: dict[str, int] = field(default_factory=dict)

    def add(self, sample: Sample, source: str) -> None:
        self.lengths.append(len(sample.input_ids))
        self.trained += sample.num_targets
        self.per_source[source] = self.per_source.get(source, 0) + 1

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


def padded_efficiency(lengths: list[int], micro_batch_size: int) -> float:
    """Real tokens / tensor positions when each micro-batch pads to its longest (in stream order)."""
    positions = sum(max(lengths[i : i + micro_batch_size]) * len(lengths[i : i + micro_batch_size])
                    for i in range(0, len(lengths), micro_batch_size))
    return sum(lengths) / max(positions, 1)


def packed_efficiency(lengths: list[int], max_length: int) -> float:
    """Real tokens / positions when samples are packed into rows of max_length."""
    packer = Packer(max_length)
    rows = 0
    for n in lengths:
        rows += len(packer.add(Sample([0] * n, [IGNORE] * n)))
    rows += len(packer.flush())
    return sum(lengths) / max(rows * max_length, 1)


def show_sample(console: Console, tokenizer, sample: Sample, title: str, *, task: str = "causal_lm",
                id2label: dict[int, str] | None = None) -> None:
    text = Text()
    if task == "token_classification":
        # Word -> sub-tokens -> tag: each sub-token with the tag it trains on, or dim when it carries none.
        for token, target in zip(sample.input_ids, sample.targets):
            piece = tokenizer.convert_ids_to_tokens(token)
            if target == IGNORE:
                text.append(f"{piece} ", style="dim")
            else:
                text.append(piece, style="bold")
                text.append(f"/{(id2label or {}).get(target, target)} ", style="green")
    elif sample.span_end is not None:
        # Extractive QA: the window (question, then its share of the context) with the answer span in green.
        start, end = sample.targets, sample.span_end
        for i, token in enumerate(sample.input_ids):
            inside = 0 < start <= i <= end
            text.append(tokenizer.decode([token]) + " ", style="bold green" if inside else "dim")
        if start == 0:
            text.append("  → no answer in this window", style="bold yellow")
    elif sample.decoder_input_ids is not None:
        # seq2seq: what the encoder reads, then what the decoder learns to write.
        text.append(tokenizer.decode(sample.input_ids), style="dim")
        text.append("\n  → ", style="bold")
        text.append(tokenizer.decode(sample.targets), style="bold green")
    elif isinstance(sample.targets, int):
        text.append(tokenizer.decode(sample.input_ids))
        text.append(f"  → label {sample.targets}", style="bold green")
    else:
        # targets[t] is the token at t+1: token t+1 is trained when targets[t] is set.
        trained = [False] + [t != IGNORE for t in sample.targets[:-1]]
        for token, is_trained in zip(sample.input_ids, trained):
            piece = tokenizer.decode([token])
            text.append(piece, style="bold green" if is_trained else "dim")
    console.rule(f"[bold]{title}[/]  {len(sample.input_ids)} tokens, {sample.num_targets} trained")
    console.print(text)


def histogram(lengths: list[int], max_length: int, bins: int = 10) -> Table:
    table = Table(title="sample lengths (tokens)", show_header=True)
    table.add_column("length", justify="right")
    table.add_column("samples", justify="right")
    table.add_column("")
    width = max(1, -(-max_length // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min((n - 1) // width, bins - 1)] += 1
    top = max(counts) or 1
    for i, c in enumerate(counts):
        table.add_row(f"{i * width + 1}–{min((i + 1) * width, max_length)}", f"{c:,}", "█" * round(30 * c / top))
    return table


def inspect(cfg: RunConfig, run_data: RunData, tokenizer, *, show: int = 3, limit: int | None = None,
            console: Console | None = None) -> dict:
    """Print samples and corpus statistics; returns the statistics."""
    console = console or Console(highlight=False, soft_wrap=True)
    stats = SplitStats()
    corpus = CorpusStats()
    names = source_names(cfg.data.train)
    streams = source_streams(cfg.data.train, "train", run_data.build, stats, seed=cfg.train.seed, dp_rank=0, dp_size=1,
                             train=False, buffer_size=128)
    shown = taken = 0
    for name, stream in zip(names, streams):
        # Records used or refused so far (the stream reads ahead in chunks: stats.records runs ahead of it).
        while (limit is None or taken + stats.bad < limit) and (sample := stream.next()) is not None:
            taken += 1
            corpus.add(sample, name)
            if shown < show:
                show_sample(console, tokenizer, sample, f"sample {shown + 1} ({name})", task=cfg.model.task,
                            id2label=run_data.id2label)
                shown += 1

    d = cfg.data
    summary = {
        "records": taken + stats.bad, "samples": taken, "tokens": corpus.tokens, "trained_tokens": corpus.trained,
        "truncated": stats.truncated, "skipped": dict(stats.skipped),
        "padded_efficiency": padded_efficiency(corpus.lengths, cfg.train.micro_batch_size) if corpus.lengths else 0.0,
        "packed_efficiency": packed_efficiency(corpus.lengths, d.max_length) if corpus.lengths else 0.0,
        "per_source": corpus.per_source,
    }
    table = Table(title=f"training data{' (first ' + str(limit) + ' records)' if limit else ''}")
    table.add_column("")
    table.add_column("", justify="right")
    for key in ("records", "samples", "tokens", "trained_tokens", "truncated"):
        table.add_row(key.replace("_", " "), f"{summary[key]:,}")
    for reason, n in stats.skipped.most_common():
        table.add_row(f"skipped: {reason}", f"{n:,}")
    table.add_row(f"real tokens per position, padded per batch of {cfg.train.micro_batch_size}",
                  f"{summary['padded_efficiency']:.1%}")
    if cfg.model.task == "causal_lm":  # the only task that packs
        table.add_row(f"real tokens per position, packed into rows of {d.max_length}",
                      f"{summary['packed_efficiency']:.1%}")
    for name, n in corpus.per_source.items():
        table.add_row(f"samples from {name}", f"{n:,}")
    console.print(table)
    if corpus.lengths:
        console.print(histogram(corpus.lengths, d.max_length))
    for line in stats.first_bad:
        console.print(f"[yellow]skipped[/] {line}")
    return summary
