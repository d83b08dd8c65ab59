"""Effects against the noise floor: median [min–max] over seeds, and whether an effect leaves the baseline's spread.

An effect counts only when its median falls outside the baseline's own [min, max] over the same seeds; anything
inside is "not distinguishable from noise". A run that never reached a target counts as infinitely late, so a
median of "not reached" is still comparable.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

Number = float | int | None


def _key(v: Number) -> float:
    return math.inf if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def median(values: Sequence[Number]) -> float:
    """Median with None (not reached / diverged) as +inf; nan when there are no values."""
    return statistics.median([_key(v) for v in values]) if values else math.nan


def spread(values: Sequence[Number], fmt: str = "{:.3g}", none: str = "not reached") -> str:
    """'median [min–max]', None (and +inf) shown as `none`; just `none` when every value is None."""
    if not values:
        return "—"
    keys = sorted(_key(v) for v in values)
    if math.isinf(keys[0]):
        return none

    def show(v: float) -> str:
        return none if math.isinf(v) else fmt.format(v)

    return f"{show(median(values))} [{show(keys[0])}–{show(keys[-1])}]"


def outside(effect: Sequence[Number], baseline: Sequence[Number]) -> int:
    """+1 if the effect's median is above the baseline's max, -1 if below its min, 0 inside (noise)."""
    if not effect or not baseline:
        return 0
    med, keys = median(effect), [_key(v) for v in baseline]
    if med > max(keys):
        return 1
    if med < min(keys):
        return -1
    return 0


def verdict(effects: dict[str, tuple[Sequence[Number], Sequence[Number]]]) -> str:
    """The 'outside baseline spread?' cell: which metrics left the baseline's spread, and which way."""
    moved = [f"{name} {'↑' if d > 0 else '↓'}" for name, (e, b) in effects.items() if (d := outside(e, b))]
    return "yes: " + ", ".join(moved) if moved else "no (not distinguishable from noise)"


def sig(v: float, digits: int = 4) -> float | None:
    """A float rounded to `digits` significant digits for the committed per-step files (None if not finite)."""
    if v is None or not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}")
