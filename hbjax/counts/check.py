"""The posterior predictive check of a count regression's likelihood.

The dispersion index ``sum (y - mu)^2 / sum mu`` and the share of zero counts, observed
against counts replicated from the fit, overall and per group (:class:`PredictiveCheck`).
A Poisson fit of overdispersed sales fails it; a negative binomial passes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax
import numpy as np
import pandas as pd
from jaxtyping import Bool, Float, Int

from .._types import PRNGKeyArray
from ..vi.checks import NutsCheck, UnitImportance, nuts_check, on_value_scale, unit_importance
from ..vi.devices import seed_from_key
from ..vi.guide import AbstractGuide, sample_once
from ..vi.layers import Centred
from .frame import CountData, price_slope
from .saved import SavedCountFit


def predictive_check(
    data: CountData,
    guide: AbstractGuide,
    *,
    key: PRNGKeyArray,
    num_units: int = 500,
    num_draws: int = 30,
    level: str | None = None,
) -> PredictiveCheck:
    """Observed counts of a subsample of units against counts replicated from the fit.

    Each of ``num_draws`` draws of all latents from ``guide`` gives every row's expected
    count ``mu`` (with zero inflation, ``(1 - pi) x rate``) and a replicated count from
    the likelihood (its dispersion per row, its structural zeros). A statistic whose
    observed value is in the outer 1% of its replicas and far from them contradicts the
    likelihood (see :class:`PredictiveCheck`).

    Args:
        data: the fitted table (:func:`hbjax.counts.from_frame`).
        guide: the fitted guide.
        key: PRNG key (the subsample, the draws, the replicas).
        num_units: units to check (all when there are fewer).
        num_draws: replicated data sets (at least 20).
        level: the group level of the per-group rows (default: the dispersion's level,
            else the coarsest); ``None`` without group levels: one group.
    """
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 20:
        raise ValueError(f"num_draws must be an int >= 20; got {num_draws!r}.")
    model, rows = data.model, data.rows
    levels = list(data.levels)
    level = level or model.dispersion_level or (levels[-1] if levels else None)
    if level is not None and level not in data.levels:
        raise ValueError(f"level {level!r} is not a group level ({levels}).")
    rng = np.random.default_rng(seed_from_key(key))
    units = rng.choice(model.n_units, min(num_units, model.n_units), replace=False)
    picked = np.isin(np.asarray(rows.unit), units)
    subset = jax.tree.map(lambda x: np.asarray(x)[picked], rows)
    draws = sample_once(guide, num_draws, jax.random.fold_in(key, 1))
    log_rate, parameter, inflation = jax.jit(jax.vmap(lambda z: _per_row(model, z, subset)))(draws)
    mu = np.exp(np.asarray(log_rate, np.float64))
    if inflation is not None:
        mu = mu * (1.0 - np.asarray(inflation, np.float64)[:, None])
    unit = np.asarray(subset.unit)
    group = np.zeros(len(unit), np.int64)
    if level is not None:
        group = np.asarray(model.table.levels[level])[unit]

    def replicate(draw: int, m: np.ndarray) -> np.ndarray:
        p = None if parameter is None else np.asarray(parameter[draw], np.float64)
        if inflation is None:
            return model.likelihood.sample(rng, m, p)
        pi = float(inflation[draw])
        counts = model.likelihood.sample(rng, m / (1.0 - pi), p)
        return np.where(rng.random(m.shape) < pi, 0, counts)

    table = predictive_table(
        mu,
        np.asarray(subset.columns["counts"], np.float64),
        np.ones(len(unit), bool),
        group,
        len(data.levels[level]) if level is not None else 1,
        replicate,
    )
    return PredictiveCheck(table, model.likelihood.name, len(units), num_draws)


def _per_row(model, z, rows):  # noqa: ANN001, ANN202
    """``[row]`` log rates, the likelihood's parameter per row (or ``None``), zero share."""
    log_rate = model.log_rate(z, rows)
    parameter = model.log_dispersion(z)
    if parameter is not None and model.dispersion_level is not None:
        parameter = parameter[model.table.levels[model.dispersion_level][rows.unit]]
    if model.zero_inflation is None:
        return log_rate, parameter, None
    return log_rate, parameter, jax.nn.sigmoid(model.zero_inflation(z.zero_inflation))


#: The predictive check flags a statistic whose observed value is beyond this tail
#: probability of its replicated values (either side) ...
PREDICTIVE_TAIL = 0.01
#: ... and, for the dispersion index, this factor from the replicated median (either way);
DISPERSION_FACTOR = 1.5
#: for the share of zeros, this many points from it ...
ZERO_SHARE_GAP = 0.02
#: ... and this factor (either way). With thousands of cells the replicated statistics are
#: so precise that a tail probability alone flags misfits too small to matter, and
#: replicas from a fitted hierarchy are not quite the data's: the fitted means, made from
#: the same data, sit a little closer to it than to replicas (a correct model's dispersion
#: index is a few percent below its replicas'), and with few periods per unit the fitted
#: log means spread a little wider than the true ones, which adds zeros (measured: three-
#: level negative-binomial tables of 40 x 16 from the true model replicate 0.010-0.015 more
#: zeros than the truth gives; a 2-point gap alone flagged the true likelihood in 3 of 6).
#: A likelihood that misses structural zeros is off by a factor (30% observed, 10%
#: replicated).
ZERO_SHARE_FACTOR = 1.5


@dataclasses.dataclass(frozen=True)
class PredictiveCheck:
    """Observed counts against replicas from the fit (:func:`hbjax.counts.predictive_check`).

    Attributes:
        table: one row per statistic and scope: ``statistic`` (``dispersion_index``:
            ``sum (y - mu)^2 / sum mu`` over observed cells, 1 for Poisson counts around
            their means; ``zero_share``: share of cells with no sales), ``group`` (index,
            or -1 for all checked units), ``observed`` and ``replicated`` (medians over
            draws), ``replicated_q05``, ``replicated_q95`` and ``p_value``
            (``P(replicated >= observed)``).
        likelihood: the fitted likelihood's name.
        units_checked: units in the subsample.
        draws: replicated data sets.
    """

    table: pd.DataFrame
    likelihood: str
    units_checked: int
    draws: int

    def _overall(self, statistic: str) -> pd.Series:
        rows = self.table[(self.table["statistic"] == statistic) & (self.table["group"] == -1)]
        return rows.iloc[0]

    @property
    def flagged(self) -> list[str]:
        """The overall statistics the data contradict (empty: none)."""
        out = []
        for statistic in ("dispersion_index", "zero_share"):
            row = self._overall(statistic)
            tail = row["p_value"] < PREDICTIVE_TAIL or row["p_value"] > 1 - PREDICTIVE_TAIL
            if statistic == "dispersion_index":
                ratio = row["observed"] / max(row["replicated"], 1e-300)
                large = not 1 / DISPERSION_FACTOR <= ratio <= DISPERSION_FACTOR
            else:
                observed, replicated = row["observed"], row["replicated"]
                ratio = (observed + 1e-12) / (replicated + 1e-12)
                large = abs(observed - replicated) >= ZERO_SHARE_GAP and not (
                    1 / ZERO_SHARE_FACTOR <= ratio <= ZERO_SHARE_FACTOR
                )
            if tail and large:
                out.append(statistic)
        return out

    @property
    def figures(self) -> str:
        """The overall statistics, observed against replicated, in words."""
        d, z = self._overall("dispersion_index"), self._overall("zero_share")
        return (
            f"dispersion index {d['observed']:.2f} observed vs {d['replicated']:.2f} "
            f"replicated (90% {d['replicated_q05']:.2f}-{d['replicated_q95']:.2f}); zero "
            f"share {z['observed']:.1%} vs {z['replicated']:.1%}"
        )

    @property
    def verdict(self) -> str:
        """``"consistent"`` or ``"contradicted"`` and the figures, in words."""
        d, z = self._overall("dispersion_index"), self._overall("zero_share")
        figures = self.figures
        if not self.flagged:
            return f"consistent with the data ({figures})"
        problems = []
        if "dispersion_index" in self.flagged:
            ratio = d["observed"] / d["replicated"]
            if ratio > 1:
                problems.append(
                    f"the counts vary {ratio:.1f}x as much around the fitted means as the "
                    f"{self.likelihood} likelihood allows, so its intervals are too narrow"
                )
            else:
                problems.append(
                    f"the counts vary less than the {self.likelihood} likelihood says "
                    "(underdispersed: its intervals are wider than they need be; a negative "
                    "binomial can only add variance)"
                )
        if "zero_share" in self.flagged:
            more = "more" if z["observed"] > z["replicated"] else "fewer"
            problems.append(f"the data have {more} weeks without sales than it replicates")
        overdispersed = d["observed"] > d["replicated"]
        advice = ""
        if self.likelihood == "poisson" and overdispersed and "dispersion_index" in self.flagged:
            advice = "; fit with --likelihood negbin"
        return f"contradicted: {'; '.join(problems)} ({figures}){advice}"

    def to_dict(self, groups: pd.Index | None = None) -> dict[str, object]:
        """For JSON: the overall statistics, per-group ones (labelled), the verdict."""

        def row(r: pd.Series) -> dict[str, float]:
            keys = ("observed", "replicated", "replicated_q05", "replicated_q95", "p_value")
            return {k: float(r[k]) for k in keys}

        per_group = []
        for g, rows in self.table[self.table["group"] >= 0].groupby("group", sort=True):
            label = str(groups[g]) if groups is not None else int(g)
            per_group.append(
                {"group": label, **{r["statistic"]: row(r) for _, r in rows.iterrows()}}
            )
        return {
            "likelihood": self.likelihood,
            "units_checked": self.units_checked,
            "draws": self.draws,
            "dispersion_index": row(self._overall("dispersion_index")),
            "zero_share": row(self._overall("zero_share")),
            "groups": per_group,
            "flagged": self.flagged,
            "verdict": self.verdict,
        }


def predictive_table(
    mu: Float[np.ndarray, "draw cell"],
    counts: Float[np.ndarray, " cell"],
    observed: Bool[np.ndarray, " cell"],
    group: Int[np.ndarray, " cell"],
    n_groups: int,
    replicate: Callable[[int, np.ndarray], np.ndarray],
) -> pd.DataFrame:
    """:class:`PredictiveCheck`'s table from expected counts drawn from the fit.

    Args:
        mu: the expected count of every cell, per draw of the latents.
        counts: the observed counts.
        observed: which cells hold data (the others are ignored).
        group: each cell's group (for the per-group rows).
        n_groups: groups.
        replicate: ``replicate(draw, mu[draw]) -> counts`` drawn from the likelihood.
    """
    num_draws = mu.shape[0]
    y = np.where(observed, counts, 0.0)

    def per_group(cells: np.ndarray) -> np.ndarray:
        """``[group + 1]`` sums of cells: every group, then all."""
        sums = np.bincount(group, weights=cells, minlength=n_groups)
        return np.append(sums, sums.sum())

    n_cells = per_group(observed.astype(np.float64))
    zeros_observed = per_group((observed & (y == 0)).astype(np.float64)) / np.maximum(n_cells, 1)
    stats: dict[str, list[np.ndarray]] = {k: [] for k in ("d_obs", "d_rep", "z_rep")}
    for s in range(num_draws):
        m = np.where(observed, mu[s], 0.0)
        replica = np.where(observed, replicate(s, m), 0.0)
        total = np.maximum(per_group(m), 1e-300)
        stats["d_obs"].append(per_group((y - m) ** 2) / total)
        stats["d_rep"].append(per_group((replica - m) ** 2) / total)
        z = per_group((observed & (replica == 0)).astype(np.float64)) / np.maximum(n_cells, 1)
        stats["z_rep"].append(z)
    d_obs, d_rep, z_rep = (np.stack(stats[k]) for k in ("d_obs", "d_rep", "z_rep"))
    z_obs = np.broadcast_to(zeros_observed, z_rep.shape)
    rows = []
    scopes = [*range(n_groups), -1]
    for name, obs, rep in (("dispersion_index", d_obs, d_rep), ("zero_share", z_obs, z_rep)):
        # ties (e.g. no zeros anywhere) count half: a statistic the data cannot move is no flag
        p = np.mean(rep > obs, axis=0) + 0.5 * np.mean(rep == obs, axis=0)
        q05, q50, q95 = np.quantile(rep, [0.05, 0.5, 0.95], axis=0)
        for j, scope in enumerate(scopes):
            if n_cells[j] == 0:
                continue
            rows.append(
                {
                    "statistic": name,
                    "group": scope,
                    "observed": float(np.median(obs[:, j])),
                    "replicated": float(q50[j]),
                    "replicated_q05": float(q05[j]),
                    "replicated_q95": float(q95[j]),
                    "p_value": float(p[j]),
                }
            )
    return pd.DataFrame(rows)


def check_saved_fit(
    saved: SavedCountFit,
    path: str | os.PathLike[str],
    *,
    key: PRNGKeyArray,
    num_units: int = 50,
    num_shared: int = 4,
    warmup: int = 300,
    draws: int = 300,
) -> tuple[pd.DataFrame, NutsCheck, UnitImportance]:
    """A saved fit's per-unit slopes against NUTS, and the per-unit k-hat (``hbjax check``).

    ``path`` is the fitted table, read as the fit read it and checked to be it
    (:meth:`~hbjax.counts.SavedCountFit.fitted_table`). Returns the NUTS table of every
    per-unit slope the verdict covers, price elasticities first (``leaf`` ``"elasticity"``,
    then the covariate's name; on the slope's scale with the centred hierarchy, else their
    latents), the NUTS check (:func:`hbjax.vi.checks.nuts_check`) and the per-unit k-hat.

    Raises:
        ValueError: the fit has no per-unit log slope (a price), or ``path`` is another table.
    """
    fitted = saved.data
    price = price_slope(fitted)
    if price is None:
        raise ValueError(
            "the fit has no per-product log slope (a price) to check; hbjax check compares "
            "products' price elasticities with NUTS."
        )
    rows, model = saved.fitted_table(path).rows, fitted.model
    importance = unit_importance(model, saved.guide, rows, key=jax.random.fold_in(key, 0))
    nuts = nuts_check(
        model,
        saved.guide,
        rows,
        key=jax.random.fold_in(key, 1),
        num_units=num_units,
        num_shared=num_shared,
        warmup=warmup,
        draws=draws,
    )
    parts = []  # the price first, then every other per-unit slope the verdict covers
    for slope in sorted(fitted.spec.slopes, key=lambda s: s is not price):
        part = nuts.table[nuts.table["leaf"] == f"slopes['{slope.name}']['unit']"].copy()
        if part.empty:
            continue
        part.insert(0, fitted.spec.unit, fitted.units[part.pop("unit").to_numpy()])
        layer = model.slopes[slope.name]
        name = "elasticity" if slope is price else slope.name
        if isinstance(layer.hierarchy, Centred):  # b_i = loc + scale v_i: the slope itself
            spread = model.spread[slope.name]  # per unit of the column
            loc, scale = float(layer.top.loc) / spread, float(layer.unit_scale) / spread
            part = on_value_scale(part, loc, scale, name)
        parts.append(part)
    return pd.concat(parts, ignore_index=True), nuts, importance


def check_lines(
    table: pd.DataFrame, nuts: NutsCheck, importance: UnitImportance, out: str
) -> list[str]:
    """What ``hbjax check`` prints of :func:`check_saved_fit`'s results (written to ``out``)."""
    unit = table.columns[0]
    lines = [
        f"checked {table[unit].nunique()} random products with NUTS (BlackJAX; "
        f"{nuts.num_shared} chains x {nuts.draws} draws, each chain given one draw of the "
        f"shared latents from the fit; {nuts.divergences} divergent)"
    ]
    leaves = table["leaf"].nunique() > 1  # several slopes per product: name each row's
    head = f"{unit:<12} " + (f"{'slope':<12} " if leaves else "")
    lines.append(f"\n{head}{'fit mean [5%, 95%]':>28} {'NUTS median':>11} {'sd ratio':>8}")
    for _, row in table.head(20).iterrows():
        lines.append(
            f"{str(row[unit]):<12} "
            + (f"{str(row['leaf']):<12} " if leaves else "")
            + f"{interval(row):>28} {row['nuts_median']:11.3f} "
            f"{row['sd_ratio']:8.2f}" + ("" if row["covered"] else "  outside")
        )
    if len(table) > 20:
        lines.append(f"... ({len(table) - 20} more rows in {out})")
    lines.append(f"\nintervals against NUTS: {nuts.verdict}")
    lines.append(f"per-product k-hat: {importance.verdict}")
    return [*lines, f"wrote {out}"]


def interval(row: pd.Series | dict[str, float]) -> str:
    """``mean [q05, q95]`` of a summary row, aligned."""
    return f"{row['mean']:7.3f}  [{row['q05']:7.3f}, {row['q95']:7.3f}]"


__all__ = [
    "check_lines",
    "check_saved_fit",
    "interval",
    "DISPERSION_FACTOR",
    "PREDICTIVE_TAIL",
    "ZERO_SHARE_FACTOR",
    "ZERO_SHARE_GAP",
    "PredictiveCheck",
    "predictive_check",
    "predictive_table",
]
