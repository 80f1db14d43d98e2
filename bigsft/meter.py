"""What a log line reports about the steps since the last one: the loss, throughput, FLOPs, MFU and
how much of the computed positions were real tokens."""

from __future__ import annotations

import time

from bigsft import dist, tracking


class Meter:
    """Sums the windows between two log lines. `restart` after anything that is not training (an eval,
    a save), so the time it took does not count against throughput."""

    def __init__(self, *, parameters: int, layers: int, hidden: int, world_size: int, causal: bool,
                 peak_tflops: float | None):
        self.parameters, self.layers, self.hidden = parameters, layers, hidden
        self.world_size, self.causal, self.peak = world_size, causal, peak_tflops
        self.restart()
        self._zero()

    def restart(self) -> None:
        self.clock = time.perf_counter()

    def _zero(self) -> None:
        self.loss_sum = 0.0  # this rank's share, of applied steps only
        self.targets = self.tokens = self.positions = self.samples = self.flops = 0.0

    def add(self, counts, loss_sum: float | None) -> None:
        """One window's global counts; `loss_sum` None for a skipped step (its loss is not reported)."""
        if loss_sum is not None:
            self.loss_sum += loss_sum
            self.targets += counts.targets
        self.tokens += counts.tokens
        self.positions += counts.positions
        self.samples += counts.samples
        self.flops += tracking.model_flops(params=self.parameters, layers=self.layers, hidden=self.hidden,
                                           tokens=counts.tokens, attention_pairs=counts.attention_pairs)

    def flush(self) -> dict[str, float | None]:
        """Collective (the loss is summed over ranks): the figures since the last flush, then starts over."""
        (loss_total,) = dist.all_reduce_sum([self.loss_sum])
        elapsed = max(time.perf_counter() - self.clock, 1e-9)
        tflops = self.flops / elapsed / self.world_size / 1e12
        figures = {
            "loss": loss_total / self.targets if self.targets else None,
            "tokens_per_s": (self.targets if self.causal else self.tokens) / elapsed,
            "samples_per_s": self.samples / elapsed,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak if self.peak else None,
            "data/efficiency": self.tokens / max(self.positions, 1.0),
        }
        self._zero()
        self.restart()
        return figures
