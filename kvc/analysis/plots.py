"""PNG figures of a ``kvc analyze`` report (matplotlib, Agg backend): scree, rank heatmap, channel magnitudes."""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .report import LABELS, Report  # noqa: E402
from ..io.capture import CaptureFile  # noqa: E402
from ..io.atomic import atomic_path  # noqa: E402

PLOT_FILES = ("scree.png", "rank_heatmap.png", "channel_magnitude.png")
COLORS = ("tab:red", "tab:blue", "tab:green")


def _in_first_group(record: dict) -> bool:
    """Whether a record belongs to the first sequence/block (every record does when pooled)."""
    return record["seq"] in (None, 0) and record["block"] in (None, 0)


def _first_group(report: Report, tensor: str) -> list[dict]:
    """Records of the first sequence/block, analyzed only."""
    return [r for r in report.heads if r["tensor"] == tensor and _in_first_group(r) and r["rank"] is not None]


def _save(fig, path: Path, force: bool) -> None:
    with atomic_path(path, force) as tmp:
        fig.savefig(tmp, dpi=130, bbox_inches="tight", format="png")
    plt.close(fig)


def scree(report: Report, tensors: list[str], path: Path, force: bool) -> None:
    """Singular values with the extrapolated bulk edge: the heads of most, median and least low-rank energy."""
    fig, axes = plt.subplots(1, len(tensors), figsize=(5 * len(tensors), 4.2), squeeze=False)
    for ax, name in zip(axes[0], tensors):
        recs = sorted(_first_group(report, name), key=lambda r: r["energy_lowrank"])
        chosen = list({id(r): r for r in (recs[-1], recs[len(recs) // 2], recs[0])}.values()) if recs else []
        for color, r in zip(COLORS, chosen):
            sv = report.spectra[(r["layer"], name)][0, r["head"]].numpy()
            idx = np.arange(1, len(sv) + 1)
            label = f"layer {r['layer']} head {r['head']}: rank {r['rank']}, {100 * r['energy_lowrank']:.0f}% energy"
            ax.semilogy(idx, sv, ".-", color=color, lw=1, ms=3, label=label)
            ax.semilogy(idx[: r["rank"]], sv[: r["rank"]], "o", color=color, ms=6)
            ax.axhline(r["bulk_edge"], color=color, ls="--", lw=1)
        ax.set_title(f"{name} ({LABELS.get(name, name)})")
        ax.set_xlabel("index i")
        ax.set_ylabel("singular value y_i")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("Scree plots: dots above the dashed bulk edge (extrapolated, same colour) are the detected rank",
                 fontsize=10)
    fig.tight_layout()
    _save(fig, path, force)


def rank_heatmap(report: Report, tensors: list[str], path: Path, force: bool) -> None:
    """Rank per (layer, KV head), the median over sequences/blocks, one panel per tensor."""
    layers = report.summary["layers"]
    heads = 1 + max(r["head"] for r in report.heads)
    grids = {}
    for name in tensors:
        grid = np.full((len(layers), heads), np.nan)
        cells: dict[tuple[int, int], list[int]] = {}
        for r in report.heads:
            if r["tensor"] == name and r["rank"] is not None:
                cells.setdefault((layers.index(r["layer"]), r["head"]), []).append(r["rank"])
        for (i, h), ranks in cells.items():
            grid[i, h] = statistics.median(ranks)
        grids[name] = grid
    vmax = max(1.0, max(np.nanmax(g) if np.isfinite(g).any() else 0 for g in grids.values()))
    height = 1.2 + 0.22 * len(layers)
    fig, axes = plt.subplots(1, len(tensors), figsize=(1.5 + (0.45 * heads + 1.0) * len(tensors), height),
                             squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], tensors):
        im = ax.imshow(grids[name], cmap="viridis", vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
        for (i, h), v in np.ndenumerate(grids[name]):
            if np.isfinite(v):
                ax.text(h, i, f"{v:g}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 * vmax else "black")
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(heads))
        ax.set_xlabel("KV head")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    axes[0][0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="rank")
    fig.suptitle(f"Detected rank ({report.summary['rank_rule']} rule, {report.summary['mode']})", fontsize=10)
    _save(fig, path, force)


def outlier_head(report: Report, tensor: str) -> tuple[int, int]:
    """(layer, head) whose channel RMS ratio is largest, in the first sequence/block."""
    recs = [r for r in report.heads if r["tensor"] == tensor and _in_first_group(r)]
    best = max(recs, key=lambda r: r["max_rms_ratio"] or 0)
    return best["layer"], best["head"]


def channel_magnitude(report: Report, panels: dict[str, torch.Tensor], layer: int, head: int,
                      path: Path, force: bool) -> None:
    """|x| over tokens x channels for one head, before/after RoPE, and channel RMS / median across layers."""
    names = list(panels)
    layers = report.summary["layers"]
    fig, axes = plt.subplots(2, len(names), figsize=(5.5 * len(names), 9), squeeze=False,
                             gridspec_kw={"height_ratios": [1.3, 1]})
    vmax = max(float(p.abs().max()) for p in panels.values())
    for ax, name in zip(axes[0], names):
        im = ax.imshow(panels[name].abs().numpy(), cmap="magma", vmin=0, vmax=vmax, aspect="auto",
                       interpolation="nearest")
        ax.set_title(f"|{name}|, layer {layer} head {head}, sequence 0", fontsize=10)
        ax.set_xlabel("channel")
        ax.set_ylabel("token")
        fig.colorbar(im, ax=ax, shrink=0.85)
    for ax, name in zip(axes[1], names):
        ratio = np.full((len(layers), panels[name].shape[-1]), np.nan)
        for r in report.heads:
            if r["tensor"] == name and r["head"] == head and _in_first_group(r):
                rms = np.array([np.nan if x is None else x for x in r["channel_rms"]])
                ratio[layers.index(r["layer"])] = rms / np.nanmedian(rms)
        im = ax.imshow(ratio, cmap="viridis", aspect="auto", interpolation="nearest",
                       norm=matplotlib.colors.LogNorm(vmin=0.1, vmax=max(10.0, float(np.nanmax(ratio)))))
        ax.set_title(f"{name}: channel RMS / median, head {head}", fontsize=10)
        ax.set_xlabel("channel")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=6 if len(layers) > 16 else 9)
        bar = fig.colorbar(im, ax=ax, shrink=0.85)
        if report.summary["outlier_factor"] is not None:
            bar.ax.axhline(report.summary["outlier_factor"], color="red", lw=2)
    fig.suptitle(f"Channel magnitudes; outlier: {report.summary['outlier_rule']} (red mark on the lower colour bars)",
                 fontsize=11)
    fig.tight_layout()
    _save(fig, path, force)


def write_all(report: Report, capture: CaptureFile, tensors: list[str], paths: list[Path], force: bool) -> None:
    """The three figures, to paths in PLOT_FILES order; the channel figure shows the strongest-outlier head."""
    scree_path, rank_path, channel_path = paths
    scree(report, tensors, scree_path, force)
    rank_heatmap(report, tensors, rank_path, force)
    pair = [name for name in ("k_pre", "k") if name in tensors] or tensors[:1]
    layer, head = outlier_head(report, pair[0])
    panels = {name: capture.tensor(layer, name, torch.float32)[0, head] for name in pair}
    channel_magnitude(report, panels, layer, head, channel_path, force)
