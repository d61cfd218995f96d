"""Side-by-side latency: time several runners of the same work fairly on one noisy machine.

Calls are made in alternating blocks. Each block starts with one untimed call, so that the runner
that ran before (whose thread pool may still be spinning, onnxruntime's default) has gone quiet and
this runner's caches are warm; the block's remaining calls are timed. The runner order rotates from
block to block, so no runner always follows the same one. Interleaving single calls instead lets one
runtime's spinning threads steal the cores from the next call: measured here on one conv layer, that
moved a direct-vs-Winograd ratio from 1.35-1.47x (blocks) to 3.1-3.7x (single calls).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class LatencyStats:
    """Timed calls of one runner, in seconds."""

    name: str
    times_s: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        """Median seconds per call."""
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        """Fastest call."""
        return min(self.times_s)

    def as_dict(self) -> dict[str, float | int]:
        """JSON-ready summary."""
        return {"median_s": self.median_s, "min_s": self.min_s, "max_s": max(self.times_s), "calls": len(self.times_s)}


def compare_latency(runners: dict[str, Callable[[], object]], blocks: int = 5, per_block: int = 3,
                    clock: Callable[[], float] = time.perf_counter) -> dict[str, LatencyStats]:
    """Time every runner in `blocks` rotating blocks of one untimed and `per_block` timed calls."""
    if not runners or blocks < 1 or per_block < 1:
        raise ValueError("compare_latency needs at least one runner, one block and one timed call per block")
    names = list(runners)
    stats = {n: LatencyStats(n) for n in names}
    for block in range(blocks):
        for name in names[block % len(names):] + names[: block % len(names)]:
            run = runners[name]
            run()
            for _ in range(per_block):
                start = clock()
                run()
                stats[name].times_s.append(clock() - start)
    return stats


def speedup(stats: dict[str, LatencyStats], baseline: str, candidate: str) -> float:
    """How many times faster `candidate` is than `baseline`, by median call time."""
    return stats[baseline].median_s / stats[candidate].median_s
