"""The heatmap of a plan's allocation: bits per entry per layer (rows) and tensor/KV head (columns)."""

from __future__ import annotations

import os

from ..io.atomic import atomic_path


def heatmap(report: dict, path: str | os.PathLike, force: bool = False) -> None:
    """Write the allocation heatmap (PNG) of a plan report (``kvc.Plan.to_json()``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = report["heads"]
    layers = sorted({r["layer"] for r in rows})
    columns = sorted({(r["tensor"], r["head"]) for r in rows})
    grid = np.full((len(layers), len(columns)), np.nan)
    for r in rows:
        grid[layers.index(r["layer"]), columns.index((r["tensor"], r["head"]))] = r["bits_per_entry"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(columns), 1.5 + 0.22 * len(layers)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(columns)), [f"{t.upper()}{h}" for t, h in columns])
    ax.set_yticks(range(len(layers)), [str(L) for L in layers])
    ax.set_xlabel("tensor and KV head")
    ax.set_ylabel("layer")
    ax.set_title(f"kvc plan: {report['bits_per_entry']:.3f} bits per entry (budget {report['budget']:g})")
    fig.colorbar(image, ax=ax, label="stored bits per entry")
    fig.tight_layout()
    with atomic_path(path, force) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
