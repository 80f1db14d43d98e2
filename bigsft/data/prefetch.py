"""The training stream's next windows, prepared in a background thread while the current step computes.

`data.prefetch` windows (optimizer steps' worth of micro-batches) wait in a bounded queue, each with the
stream's state and data counters as of its end. The trainer sees those, never the producer's own: a
checkpoint saves the state after the last window the loop took, so a resumed run draws exactly the
windows the prefetcher had prepared but the loop had not trained on. Reading, tokenizing (the fast
tokenizers release the GIL) and collating then overlap the step; a step costs max(compute, data) rather
than their sum.

An error in the producer (a DataError: too many bad records, no usable sample) is handed to the loop in
order and raised there from `next_window`, as the synchronous stream raises it. With `depth` 0 the windows
are made in the caller's thread, as before.
"""

from __future__ import annotations

import queue
import threading

from bigsft.data.scan import SplitStats
from bigsft.data.stream import TrainStream


class Prefetcher:
    """A TrainStream's windows, `depth` ahead. `stats` and `drawn` describe the windows handed out so far."""

    def __init__(self, stream: TrainStream, produced: SplitStats, *, depth: int):
        self.stream = stream
        self.produced = produced
        """The counters the stream writes as it reads (ahead of the loop)."""
        self.depth = depth
        self.stats = SplitStats()
        self.drawn = list(stream.mixed.drawn)
        self._state = stream.state_dict()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _make(self) -> tuple:
        window = self.stream.next_window()
        return window, self.stream.state_dict(), self.produced.state_dict(), list(self.stream.mixed.drawn)

    def _produce(self) -> None:
        while not self._stop.is_set():
            try:
                item = ("window", self._make())
            except BaseException as e:
                item = ("error", e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[0] == "error":
                return

    def next_window(self):
        """The next window's micro-batches (raising what the stream raised making it)."""
        if self.depth == 0:
            item = ("window", self._make())
        else:
            if self._thread is None:
                self._queue = queue.Queue(maxsize=self.depth)
                self._thread = threading.Thread(target=self._produce, name="bigsft-prefetch", daemon=True)
                self._thread.start()
            item = self._queue.get()
        kind, payload = item
        if kind == "error":
            raise payload
        window, self._state, stats, self.drawn = payload
        self.stats.load_state_dict(stats)
        return window

    def state_dict(self) -> dict:
        """The stream's state after the last window handed out (not after the ones prepared ahead)."""
        return self._state

    def load_state_dict(self, stream_state: dict, stats_state: dict) -> None:
        """Resume: before the first window."""
        if self._thread is not None:
            raise RuntimeError("load_state_dict after prefetching began")
        self.stream.load_state_dict(stream_state)
        self.produced.load_state_dict(stats_state)
        self.stats.load_state_dict(stats_state)
        self.drawn = list(self.stream.mixed.drawn)
        self._state = self.stream.state_dict()

    def close(self) -> None:
        """Stop the producer (it may be blocked on a full queue or in the middle of a window)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
