"""Named phases of a run: labels torch.profiler shows, and wall-clock totals a benchmark can read."""

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from torch.profiler import record_function


class PhaseClock:
    """Seconds spent in each named phase while `timing` is on (benchmarks/profile_run.py turns it on).

    Phases nest (a read's search inside the read), so totals are inclusive: a report subtracts the inner ones.
    The times are the host's: on a CPU that is when the work ran; a GPU's queued kernels would need a sync,
    which a training step must not pay, so GPU figures come from torch.profiler instead.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.timing = False

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        with record_function(name):  # free when no profiler runs
            if not self.timing:
                yield
                return
            start = time.perf_counter()
            try:
                yield
            finally:
                self.seconds[name] += time.perf_counter() - start

    def reset(self) -> None:
        self.seconds.clear()


phase = PhaseClock()  # one per process: the trainer, its read mode and the read all report to it
