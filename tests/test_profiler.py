"""The side-by-side latency profiler: call order, what is timed, and the figures it reports."""

import pytest

from pocketdiff.runtimes.profiler import compare_latency, speedup


class FakeClock:
    """A clock that only moves when a fake runner 'works'."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_blocks_rotate_and_the_first_call_of_each_block_is_untimed():
    clock, calls = FakeClock(), []
    cost = {"a": 2.0, "b": 1.0, "c": 0.5}

    def runner(name):
        def run():
            calls.append(name)
            # The untimed first call of a block is slow (a cold cache, the last runner's threads still spinning).
            clock.now += cost[name] * (10 if len(calls) == 1 or calls[-2] != name else 1)
        return run

    stats = compare_latency({n: runner(n) for n in cost}, blocks=3, per_block=2, clock=clock)
    assert calls == ["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["b"] * 3 + ["c"] * 3 + ["a"] * 3 + ["c"] * 3 + ["a"] * 3 + ["b"] * 3
    assert {n: s.times_s for n, s in stats.items()} == {n: [c] * 6 for n, c in cost.items()}
    assert speedup(stats, "a", "c") == pytest.approx(4.0)
    assert stats["b"].as_dict() == {"median_s": 1.0, "min_s": 1.0, "max_s": 1.0, "calls": 6}


def test_nothing_to_time_is_an_error():
    with pytest.raises(ValueError):
        compare_latency({}, blocks=1, per_block=1)
    with pytest.raises(ValueError):
        compare_latency({"a": lambda: None}, blocks=1, per_block=0)
