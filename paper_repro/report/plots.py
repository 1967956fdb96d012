"""Saving a figure as png and pdf whose bytes depend only on what is drawn: what figures.py
and regime.py both write with (its own module, so that neither imports the other)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Metadata that would change the bytes of an unchanged figure: the PDF's creation date and
# the PNG's "Software" (matplotlib's version) are left out.
_STABLE_METADATA = {".png": {"Software": None}, ".pdf": {"CreationDate": None}}


def save_figure(fig: plt.Figure, out_dir: Path, name: str) -> list[Path]:
    """`name`.png and `name`.pdf in `out_dir`; closes the figure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p, bbox_inches="tight", dpi=150, metadata=_STABLE_METADATA[p.suffix])
    plt.close(fig)
    return paths
