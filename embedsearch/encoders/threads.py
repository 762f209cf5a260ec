"""torch's intra-op thread count, chosen between batches from the speed each count gives.

Why: torch's OpenMP threads meet at a barrier after every layer and spin while they wait.
Beside one busy process on a 2-core machine, the thread that shares its core with it loses
whole time slices while the other spins, so 2 threads ran at 0.26 of their idle model
speed and 1 thread at 0.89, while 1 thread alone costs half the idle speed
(benchmarks/results/thread_policy.md). No fixed count suits both, and a machine changes
between them during one run, so the encoder measures: it runs at the full count while that
keeps its speed, tries one thread fewer when the speed falls, and keeps whichever count
gave more images/s; below the full count it tries one more thread every few batches, to
come back when the competitor leaves. Probes that lose become rarer (see
:class:`ThreadGovernor`), so an idle run loses little.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

#: Batches smaller than this are neither timed nor probed: a single image's speed says
#: little about a full batch's (``predict one.jpg``, ``serve``).
MIN_IMAGES = 8


class ThreadGovernor:
    """Picks the thread count for the next batch from the images/s of the last ones.

    A *probe* is one batch at another count, kept when it beats the last batch at the
    current count. Probes come on a schedule: the third batch tries one thread fewer (a
    competitor may be there from the start), and then, every ``interval`` batches, one
    thread fewer at the full count or one more below it; the interval starts at
    ``probe_every`` and doubles after each lost probe up to ``max_interval`` (so an idle
    run spends at most about one batch in 64 at half speed), and is reset when a probe wins.
    Besides, two batches in a row slower than ``drop`` times the best speed seen at their
    count (a competitor arrived) make the next batch a probe at one thread fewer.
    """

    def __init__(self, max_threads: int, probe_every: int = 8, max_interval: int = 64,
                 drop: float = 0.7) -> None:
        self.max_threads = max(1, max_threads)
        self.probe_every = probe_every
        self.max_interval = max_interval
        self.drop = drop
        self.current = self.max_threads
        self.peak: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.probe: int | None = None
        self.interval = probe_every
        self.until_probe = 2
        self.slow = 0
        #: (threads, images/s) of every timed batch, for benchmarks and tests.
        self.history: list[tuple[int, float]] = []

    def next_threads(self) -> int:
        return self.probe or self.current

    def record(self, threads: int, images: int, seconds: float) -> None:
        """Account one batch of ``images`` that took ``seconds`` at ``threads``."""
        if images < MIN_IMAGES or seconds <= 0:
            return
        rate = images / seconds
        self.history.append((threads, rate))
        self.peak[threads] = max(self.peak.get(threads, 0.0), rate)
        if self.probe is not None and threads == self.probe:
            if rate > self.last.get(self.current, 0.0):
                self.current, self.interval = threads, self.probe_every
            else:
                self.interval = min(2 * self.interval, self.max_interval)
            self.last[threads] = rate
            self.probe, self.until_probe, self.slow = None, self.interval, 0
            return
        self.last[threads] = rate
        self.slow = self.slow + 1 if rate < self.drop * self.peak[threads] else 0
        self.until_probe -= 1
        if self.max_threads == 1:
            return
        if self.slow >= 2 and self.current > 1:
            self.probe = self.current - 1
        elif self.until_probe <= 0:
            self.probe = (self.current - 1 if self.current == self.max_threads
                          else self.current + 1)

    @contextlib.contextmanager
    def run(self, images: int) -> Iterator[int]:
        """Run one batch of ``images`` at the chosen count (torch's count is restored after,
        so nothing else in the process sees the change); yields the count."""
        import torch

        before = torch.get_num_threads()
        threads = self.next_threads() if images >= MIN_IMAGES else self.current
        if threads != before:
            torch.set_num_threads(threads)
        try:
            start = time.perf_counter()
            yield threads
            self.record(threads, images, time.perf_counter() - start)
        finally:
            if threads != before:
                torch.set_num_threads(before)
