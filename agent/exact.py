"""Splitting a number into parts that add up to it to the last bit: :func:`remainder`.

Every split in the project (a slice among tariff bands, among GPU instances and workloads, a
capacity amount among holders) computes all parts but one by proportion and gives the last one
"the rest". ``total - fsum(others)`` alone is not enough: it is rounded, and so
``fsum(others + [rest])`` can miss ``total`` by an ulp (about 4 % of random 8-way splits did).
"""

from __future__ import annotations

import math
from typing import Sequence


def remainder(total: float, others: Sequence[float]) -> float:
    """The part that, with ``others``, adds up to ``total`` exactly: ``math.fsum([*others, part])
    == total`` where such a float exists. Starts from ``total - fsum(others)``; when that misses,
    searches the floats around it (the sum grows with the part, so a bisection finds it)."""
    rest = total - math.fsum(others)
    parts = [*others, rest]

    def total_with(r: float) -> float:
        parts[-1] = r
        return math.fsum(parts)

    got = total_with(rest)
    if got == total:
        return rest
    # Bracket the part between a sum below total and one above it, then bisect.
    gap = abs(total - got) or math.ulp(total)
    lo = hi = rest
    for _ in range(64):
        gap *= 2
        if got < total:
            lo, hi = rest, rest + gap
            if total_with(hi) >= total:
                break
        else:
            lo, hi = rest - gap, rest
            if total_with(lo) <= total:
                break
    for _ in range(200):
        mid = lo + (hi - lo) / 2
        if mid in (lo, hi):
            break
        s = total_with(mid)
        if s == total:
            return mid
        if s < total:
            lo = mid
        else:
            hi = mid
    for r in (lo, hi):
        if total_with(r) == total:
            return r
    return rest  # no float does it (a rounding tie): the caller moves another part


def settle(total: float, parts: dict, key: object) -> None:
    """Set ``parts[key]`` so that ``math.fsum(parts.values()) == total`` exactly.

    :func:`remainder` alone cannot always: where the others' exact sum sits half an ulp off
    ``total`` and the rest is as large as ``total``, rounding ties skip ``total`` for every
    possible rest (about 1 % of random splits). Then the largest other part moves one ulp
    toward zero (a change of 1e-16 of it) and the rest is solved again.
    """
    if len(parts) == 2:  # the usual split in two: the rest, and one check, settle nearly all
        (other,) = (v for k, v in parts.items() if k != key)
        rest = parts[key] = total - other
        if math.fsum((other, rest)) == total:
            return
    others = [k for k in parts if k != key]
    for _ in range(4):
        parts[key] = remainder(total, [parts[k] for k in others])
        if math.fsum(parts.values()) == total or not others:
            return
        k = max(others, key=lambda k: abs(parts[k]))
        parts[k] = math.nextafter(parts[k], 0.0)
