"""The reports' one figure style: the Agg backend (no screen needed), shared sizes and resolution, and a title that
says how to regenerate the figure."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

DPI = 110
PANEL = (5.0, 3.6)  # width, height of one panel, inches


def panels(n: int = 1, rows: int = 1, size: tuple[float, float] = PANEL):
    """A figure of n panels per row; returns (figure, axes), axes a list even for one panel."""
    fig, axes = plt.subplots(rows, n, figsize=(size[0] * n, size[1] * rows), squeeze=False)
    return fig, [ax for row in axes for ax in row]


def save(fig, path: Path, title: str = "", regenerate: str = "") -> Path:
    """Write the figure as PNG and close it."""
    if title or regenerate:
        fig.suptitle(title + (f"\n(regenerate: {regenerate})" if regenerate else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def finite(values, ceiling: float = math.inf) -> list[float]:
    """Values ready to plot: None, inf, NaN and anything above `ceiling` become gaps (NaN)."""
    return [v if isinstance(v, (int, float)) and math.isfinite(v) and v < ceiling else math.nan for v in values]
