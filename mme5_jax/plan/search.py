"""Bisect the batch or the GradCache chunk against the chip's HBM, one ahead-of-time compile per probe.

Peak memory grows with both, so the candidates are ordered and the fitting ones form a prefix: `pairs` finds the
largest global batch (whole pairs per chip) that fits, `chunk` the largest GradCache chunk, i.e. the fewest
chunk passes, that fits. Every probe is recorded, so the boundary (the last fit and the first miss) is shown.
"""
import math


def pair_candidates(work, batch_shards: int, limit: int):
    """Global batch sizes of 1, 2, ... pairs per batch shard up to `limit` per shard, kept divisible by the
    GradCache chunk."""
    chunk = work.chunk_size or 1
    step = chunk // math.gcd(chunk, batch_shards)
    return [per * batch_shards for per in range(step, limit + 1, step)]


def chunk_candidates(work, batch_shards: int):
    """GradCache chunks that divide the global batch and split over the batch shards, smallest first."""
    return [c for c in range(batch_shards, work.pairs + 1, batch_shards) if work.pairs % c == 0]


def bisect(candidates, fits):
    """-> (index of the last candidate that fits or -1, probes {index: result}); `fits(candidate)` -> (bool, result).

    Grows the upper probe by doubling from the start, then bisects between the last fit and the first miss."""
    probes = {}

    def probe(i):
        if i not in probes:
            probes[i] = fits(candidates[i])
        return probes[i][0]

    if not candidates or not probe(0):
        return -1, probes
    good, bad = 0, None
    while bad is None:
        nxt = min(2 * good + 1, len(candidates) - 1)
        if nxt == good:
            return good, probes
        if probe(nxt):
            good = nxt
        else:
            bad = nxt
    while bad - good > 1:
        mid = (good + bad) // 2
        if probe(mid):
            good = mid
        else:
            bad = mid
    return good, probes
