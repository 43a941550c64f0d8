"""Figures of a fit (matplotlib): loss, shrinkage, categories, the predictive check.

Written by ``hbjax fit --plots`` to ``OUT/plots/``; each function also returns its figure.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..extras import optional_import
from ..vi.fit import FitResult
from .check import PredictiveCheck


@dataclasses.dataclass(frozen=True)
class Summary:
    """Posterior summaries of the elasticities on the original labels.

    Each table has ``mean, sd, q05, q50, q95`` (a 90% interval and the median).

    Attributes:
        units: one row per unit: the unit and group columns named as in the input.
        groups: one row per group.
        overall: one row: the global elasticity.
        num_samples: draws the summaries are based on (0: exact, no draws).
        exact: whether the summaries are the guide's exact Gaussian marginals (the
            elasticities are linear in the latents) rather than Monte Carlo estimates.
    """

    units: pd.DataFrame
    groups: pd.DataFrame
    overall: pd.DataFrame
    num_samples: int
    exact: bool = False


def _pyplot():  # noqa: ANN202
    matplotlib = optional_import("matplotlib", purpose="hbjax fit --plots (hbjax.counts.plots)")

    if os.environ.get("MPLBACKEND") is None and matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def loss_trace(result: FitResult):  # noqa: ANN201
    """The loss of every step and its running mean (log-scaled distance to the best)."""
    plt = _pyplot()
    losses = np.asarray(result.losses, np.float64)
    steps = np.arange(len(losses))
    window = max(1, len(losses) // 100)
    running = np.convolve(losses, np.ones(window) / window, mode="valid")
    floor = min(losses.min(), running.min())
    fig, (full, tail) = plt.subplots(1, 2, figsize=(10, 3.8))
    full.plot(steps, losses - floor + 1, lw=0.5, alpha=0.4, label="loss")
    full.plot(steps[window - 1 :], running - floor + 1, lw=1.5, label=f"mean of {window} steps")
    full.set(yscale="log", xlabel="step", ylabel="loss - min + 1 (log scale)", title="Loss")
    full.legend(frameon=False)
    last = steps[len(steps) // 2 :]
    tail.plot(last, losses[len(steps) // 2 :], lw=0.5, alpha=0.4)
    tail.plot(last[window - 1 :], running[len(steps) // 2 :][: len(last) - window + 1], lw=1.5)
    tail.set(xlabel="step", ylabel="loss", title="Second half (is it flat?)")
    fig.tight_layout()
    return fig


def shrinkage(summary: Summary, *, max_units: int = 3000):  # noqa: ANN201
    """Each product's elasticity next to its category's: how far the hierarchy pools."""
    plt = _pyplot()
    units, groups = summary.units, summary.groups
    unit_col, group_col = units.columns[0], units.columns[1]
    order = groups.sort_values("mean")[group_col].tolist()
    position = {label: i for i, label in enumerate(order)}
    shown = units.sample(max_units, random_state=0) if len(units) > max_units else units
    rng = np.random.default_rng(0)
    x = shown[group_col].map(position).to_numpy() + rng.uniform(-0.25, 0.25, len(shown))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(order) + 2), 4.5))
    ax.scatter(x, shown["mean"], s=6, alpha=0.35, color="tab:blue", label=f"{unit_col} (mean)")
    g = groups.set_index(group_col).loc[order]
    ax.errorbar(
        np.arange(len(order)),
        g["mean"],
        yerr=[g["mean"] - g["q05"], g["q95"] - g["mean"]],
        fmt="o",
        color="black",
        capsize=4,
        label=f"{group_col} (mean, 90% interval)",
    )
    overall = summary.overall.iloc[0]
    ax.axhline(overall["mean"], color="tab:red", lw=1, ls="--", label="global elasticity")
    ax.set_xticks(np.arange(len(order)), [str(v) for v in order], rotation=45, ha="right")
    ax.set(ylabel="elasticity", title=f"Shrinkage: {unit_col} estimates around their {group_col}")
    ax.legend(frameon=False, fontsize="small")
    fig.tight_layout()
    return fig


def category_forest(summary: Summary):  # noqa: ANN201
    """Forest plot of the category elasticities (mean and 90% interval), sorted."""
    plt = _pyplot()
    groups = summary.groups.sort_values("mean")
    group_col = groups.columns[0]
    y = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(6, max(3, 0.3 * len(groups) + 1.5)))
    ax.hlines(y, groups["q05"], groups["q95"], color="black", lw=1.5)
    ax.plot(groups["mean"], y, "o", color="black")
    overall = summary.overall.iloc[0]
    ax.axvspan(overall["q05"], overall["q95"], color="tab:red", alpha=0.15, label="global, 90%")
    ax.axvline(overall["mean"], color="tab:red", lw=1)
    ax.set_yticks(y, [str(v) for v in groups[group_col]])
    ax.set(xlabel="elasticity (mean, 90% interval)", title=f"{group_col} elasticities")
    ax.legend(frameon=False, fontsize="small", loc="lower right")
    fig.tight_layout()
    return fig


def predictive_plot(check: PredictiveCheck, groups: list[str] | None = None):  # noqa: ANN201
    """Observed dispersion index and zero share of each group against their replicas."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (statistic, label) in zip(
        axes,
        (("dispersion_index", "dispersion index: sum (y - mu)^2 / sum mu"),
         ("zero_share", "share of cells without sales")),
        strict=True,
    ):  # fmt: skip
        rows = check.table[check.table["statistic"] == statistic]
        names = [
            "all" if g < 0 else (groups[g] if groups is not None else str(g)) for g in rows["group"]
        ]
        y = np.arange(len(rows))
        ax.hlines(y, rows["replicated_q05"], rows["replicated_q95"], color="tab:blue", lw=3,
                  alpha=0.5, label="replicated, 90%")  # fmt: skip
        ax.plot(rows["observed"], y, "o", color="black", label="observed")
        ax.set_yticks(y, names)
        ax.set(xlabel=label)
        if statistic == "dispersion_index":
            ax.set_xscale("log")
    axes[0].legend(frameon=False, fontsize="small")
    word = "contradicted by the data" if check.flagged else "consistent with the data"
    fig.suptitle(f"posterior predictive check: the {check.likelihood} model is {word}")
    fig.tight_layout()
    return fig


def write_hierarchy_plots(
    result: FitResult,
    units: Summary,
    levels: list[Summary],
    directory: str | os.PathLike[str],
    *,
    predictive: PredictiveCheck | None = None,
    predictive_groups: list[str] | None = None,
) -> list[Path]:
    """Plots of a fit with several group levels (``hbjax fit --group a,b,...``).

    ``loss.png``; ``shrinkage.png``: each unit's slope around its finest group (``units``);
    ``forest_<level>.png`` for each level's summary in ``levels`` (groups around the
    global slope); ``predictive.png`` with ``predictive`` (its groups named
    ``predictive_groups``). Returns the paths written.
    """
    figures = [
        ("loss.png", lambda: loss_trace(result)),
        ("shrinkage.png", lambda: shrinkage(units)),
    ]
    for level in levels:
        name = f"forest_{_file_safe(str(level.groups.columns[0]))}.png"
        figures.append((name, lambda level=level: category_forest(level)))
    if predictive is not None:
        figures.append(("predictive.png", lambda: predictive_plot(predictive, predictive_groups)))
    return save_figures(figures, directory)


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "level"


def save_figures(figures: list, directory: str | os.PathLike[str]) -> list[Path]:
    """Draw each ``(file name, make_figure)`` in turn, save it as PNG and close it."""
    plt = _pyplot()
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, make in figures:
        figure = make()
        figure.savefig(folder / name, dpi=110)
        plt.close(figure)
        paths.append(folder / name)
    return paths


__all__ = [
    "category_forest",
    "loss_trace",
    "predictive_plot",
    "save_figures",
    "shrinkage",
    "write_hierarchy_plots",
]
