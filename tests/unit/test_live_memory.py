"""bench/live_memory.py, the op-by-op byte counter behind the planner's activation test: it counts what ops
create while it lives, not views, in-place results or what existed before, and forgets what it is told."""

from __future__ import annotations

import sys

import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))


def test_peak_counts_new_storages_while_they_live():
    from live_memory import PeakLiveBytes

    before = torch.ones(1000)  # made outside: not counted, nor are its views and in-place updates
    with PeakLiveBytes() as counter:
        before.add_(1)
        view = before[:500]
        a = before * 2  # 4,000 bytes
        b = a + 1  # 8,000 live
        del a  # 4,000 live
        c = torch.cat([b, b])  # 4,000 + 8,000 = 12,000 live: the peak
        del b, c
        d = view * 3  # 2,000
        counter.forget(d)
    assert counter.peak == 12_000 and counter.current == 0


def test_peak_sees_autograd_saved_tensors_and_checkpoint_recompute():
    from live_memory import PeakLiveBytes

    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(256, 64)

    def block(h):
        return torch.tanh(torch.tanh(h @ w) @ w)

    def count(checkpointed: bool) -> tuple[int, int]:
        """(bytes held once the forward returns, peak through the backward)."""
        with PeakLiveBytes() as counter:
            y = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
            held = counter.current
            y.sum().backward()
        return held, counter.peak

    activation = 256 * 64 * 4
    (plain_held, _), (ckpt_held, ckpt_peak) = count(False), count(True)
    assert plain_held >= 3 * activation  # the tanh outputs saved for backward, and the output
    assert ckpt_held < plain_held  # no saved activations, the output and what the recompute will redo
    assert ckpt_peak >= 3 * activation  # the recompute in backward brings them back
