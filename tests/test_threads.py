"""torch's thread count adapts between batches to the speed each count gives."""

from __future__ import annotations

from embedsearch.encoders.threads import MIN_IMAGES, ThreadGovernor


def _run(governor: ThreadGovernor, speeds: list[dict[int, float]]) -> str:
    """Feed one 32-image batch per entry of ``speeds`` (images/s by thread count) and
    return the thread counts the governor chose, e.g. "22122"."""
    for rates in speeds:
        n = governor.next_threads()
        governor.record(n, 32, 32 / rates[n])
    return "".join(str(n) for n, _ in governor.history)


IDLE = {2: 54.0, 1: 28.0}  # thread_policy.md: 2 threads idle, 1 thread idle
BUSY = {2: 13.0, 1: 25.0}  # the same beside one busy process


def test_idle_machine_keeps_all_threads_and_probes_ever_less_often() -> None:
    chosen = _run(ThreadGovernor(2), [IDLE] * 200)
    probes = [i for i, c in enumerate(chosen) if c == "1"]
    # First probe early (a competitor may be there from the start), then each lost probe
    # doubles the wait (8 → 16, 32, 64, then 64 at most).
    assert probes == [2, 19, 52, 117, 182]


def test_a_competitor_from_the_start_moves_to_one_thread() -> None:
    chosen = _run(ThreadGovernor(2), [BUSY] * 40)
    assert chosen.startswith("221111")
    assert chosen[3:].count("2") <= 3  # only probes at 2 threads, ever rarer


def test_competitor_arriving_and_leaving() -> None:
    chosen = _run(ThreadGovernor(2, max_interval=16), [IDLE] * 30 + [BUSY] * 30 + [IDLE] * 40)
    assert chosen[34:60].count("1") >= 20  # two slow batches, a probe, then one thread
    assert chosen[-10:] == "2" * 10  # back at two threads once the competitor left


def test_single_core_and_small_batches_never_probe() -> None:
    assert set(_run(ThreadGovernor(1), [{1: 5.0}] * 20)) == {"1"}
    governor = ThreadGovernor(2)
    for _ in range(20):
        governor.record(governor.next_threads(), MIN_IMAGES - 1, 1.0)
    assert governor.history == [] and governor.next_threads() == 2

