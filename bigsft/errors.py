"""What can end a bigsft command, and its exit code.

A `UserError` is the user's to fix (a bad config, unusable data, an unusable checkpoint, a usage
mistake): one clear message and exit code 2, found before anything starts. `RunFailed` ends a run that
did start (a save that could not be written, a diverged run): exit code 1. A run stopped by a signal
after saving exits 75, which a batch script reads as "requeue me".
"""

from __future__ import annotations

from collections.abc import Sequence

EXIT_OK, EXIT_FAILED, EXIT_USER, EXIT_SAVED = 0, 1, 2, 75


class UserError(Exception):
    """Something the user must fix, found before anything started: exit code 2."""


class ConfigError(UserError):
    """Bad config or usage: every problem found, reported together."""

    def __init__(self, problems: str | Sequence[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        return f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)


class DataError(UserError):
    """Data that cannot be used at all (an unreadable file, too many bad records)."""


class RunFailed(Exception):
    """A started run that cannot go on: exit code 1."""


class CheckpointError(RunFailed):
    """A checkpoint could not be written (disk full, non-finite weights): every rank stops."""


class Diverged(RunFailed):
    """Too many optimizer steps in a row with a non-finite loss or gradient."""


class StoppedAndSaved(Exception):
    """A stop signal arrived; a checkpoint was saved: exit code 75."""
