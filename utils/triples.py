"""Typed (z, y, x) triples: any three numbers as ``tuple[int, int, int]`` or ``tuple[float, float, float]``.

Shapes, patch sizes, pools and spacings are triples throughout the code; these helpers turn the
sequences and generators they are computed from into precisely typed tuples (and refuse any other
count, instead of returning a tuple of the wrong length).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["Float3", "Int3", "float3", "int3"]

Int3 = tuple[int, int, int]
Float3 = tuple[float, float, float]


def int3(values: Iterable[Any]) -> Int3:
    """``values`` (exactly three numbers) as three ``int``; ValueError for any other count."""
    a, b, c = (int(v) for v in values)
    return (a, b, c)


def float3(values: Iterable[Any]) -> Float3:
    """``values`` (exactly three numbers) as three ``float``; ValueError for any other count."""
    a, b, c = (float(v) for v in values)
    return (a, b, c)
