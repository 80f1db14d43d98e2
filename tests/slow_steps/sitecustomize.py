"""Put this directory on PYTHONPATH to make every optimizer step of a bigsft run take at least
BIGSFT_TEST_STEP_SECONDS (default 0.25) longer, so that a test's signal lands between known steps rather
than racing a tiny model's millisecond steps. Sleeping changes no number the run computes."""

import os
import time

from bigsft import steps

_seconds = float(os.environ.get("BIGSFT_TEST_STEP_SECONDS", "0.25"))
_train_step = steps.ZeroSteps.train_step


def _slow_train_step(self, *args, **kwargs):
    time.sleep(_seconds)
    return _train_step(self, *args, **kwargs)


steps.ZeroSteps.train_step = _slow_train_step
