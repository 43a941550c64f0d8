"""A count regression from a table: columns in, model and rows out, labels kept.

>>> data = hbjax.counts.from_frame(
...     sales, unit="sku", counts="qty", groups=("subcategory", "category"),
...     slopes=[Slope("price", log=True, over=("unit", "subcategory", "category"),
...                   prior=(-2.0, 1.0)),
...             Slope("promo", over=("category",))],
...     effects=[Effect(("category", "week"))],
...     likelihood="negbin")
>>> guide = hbjax.make_guide("unitblock", data.model, loc=data.model.init_latents(data.rows))
>>> result = hbjax.fit(data.model, guide, data.rows, key=jax.random.key(0))
>>> tables = data.summary(result.guide)      # {"log_price/category": DataFrame, ...}
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import equinox as eqx
import jax
import numpy as np
import pandas as pd
from jax.sharding import Mesh

from ..io.tables import (
    DataValidationError,
    factorize,
    numeric_column,
    period_values,
    read_table,
    shown,
    which_rows,
)
from ..parallel.rows import UnitRows
from ..vi.guide import GaussianGuide, linear_moments, sample_once
from ..vi.layers import HIERARCHIES, AbstractHierarchy, Normal, as_hierarchy
from .families import AbstractCountLikelihood, checked_clip, make_likelihood
from .grid import CountGrid, GridError, place_grid
from .regression import CountLatents, CountRegression, EffectLevels, UnitTable
from .slopes import GLOBAL, UNIT, HierarchicalSlope
from .stats import draw_summary, gaussian_summary

#: Where the intercepts' prior sits: at each unit's mean covariates, or at covariates 0.
INTERCEPT_PRIORS = ("reference", "zero")


@dataclasses.dataclass(frozen=True)
class Slope:
    """A covariate and how its slope varies.

    Attributes:
        column: the table's column.
        over: where the slope varies, finest first: ``"unit"`` and/or group levels (in the
            order of ``groups``); ``()``: one fixed slope.
        prior: ``(mean, sd)`` of the global slope.
        scales: prior sd of each entry of ``over`` around its parent (default 1 each).
        log: use ``log(column)`` (e.g. prices; the column must be > 0).

    Without ``log``, ``prior`` and ``scales`` are per sd of the column over the table's
    rows (rstanarm's autoscaling: the slope times the column's sd has the prior), so a
    column's units do not change the fit; slopes are reported per unit of the column.
    With ``log`` they are on the log's own, unit-free scale (an elasticity).
    """

    column: str
    over: tuple[str, ...] = ()
    prior: tuple[float, float] = (0.0, 1.0)
    scales: tuple[float, ...] | None = None
    log: bool = False

    def __post_init__(self) -> None:
        mean, sd = self.prior
        if not (np.isfinite(mean) and np.isfinite(sd) and sd > 0):
            raise ValueError(
                f"Slope({self.column!r}): prior must be (mean, sd) with a finite mean and an "
                f"sd > 0; got {self.prior}."
            )
        if self.scales is not None and not all(np.isfinite(v) and v > 0 for v in self.scales):
            raise ValueError(
                f"Slope({self.column!r}): every scale must be a finite sd > 0; got {self.scales}."
            )

    @property
    def name(self) -> str:
        """The covariate's name: ``log_<column>`` with ``log``, else the column."""
        return f"log_{self.column}" if self.log else self.column


@dataclasses.dataclass(frozen=True)
class Effect:
    """An additive effect per cell of label columns (e.g. ``("category", "week")``).

    Attributes:
        labels: the columns whose combinations are the cells.
        scale: prior sd of each cell's effect.
    """

    labels: tuple[str, ...]
    scale: float = 3.0

    @property
    def name(self) -> str:
        """``"a:b"`` for labels ``("a", "b")``."""
        return ":".join(self.labels)


@dataclasses.dataclass(frozen=True)
class CountSpec:
    """How a table became a model: :func:`from_frame`'s arguments, less the table.

    With the labels and the per-unit arrays it rebuilds the model (saved fits); it also
    names the columns a what-if table needs (:func:`hbjax.counts.predict`).
    """

    unit: str
    counts: str
    groups: tuple[str, ...] = ()
    slopes: tuple[Slope, ...] = ()
    effects: tuple[Effect, ...] = ()
    offset: str | None = None
    period: str | None = None
    likelihood: str = "poisson"
    dispersion_by: str | None = None
    zero_inflation: tuple[float, float] | None = None
    hierarchy: str = "centred"
    intercept: tuple[float, float] = (0.0, 3.0)
    intercept_prior: str = "reference"
    centre: bool = True
    clip_log_rate: tuple[float, float] | None = None
    learn_spreads: bool = False

    def data(self, frame: pd.DataFrame) -> CountData:
        """The table's data under this spec: :func:`from_frame` with these arguments."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["zero_inflation"] = fields["zero_inflation"] or False  # None: recorded as off
        return from_frame(frame, **fields)

    def label_columns(self) -> list[str]:
        """The columns of labels: the unit, the groups and the effects' (not the period)."""
        effects = (c for e in self.effects for c in e.labels if c != self.period)
        return list(dict.fromkeys([self.unit, *self.groups, *effects]))

    def to_json(self) -> dict:
        """A JSON-ready dict (:meth:`from_json` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> CountSpec:
        """The spec :meth:`to_json` wrote (lists back to tuples)."""

        def tupled(v: object) -> object:
            return tuple(tupled(x) for x in v) if isinstance(v, list) else v

        values = {k: tupled(v) for k, v in values.items()}
        values["slopes"] = tuple(
            Slope(**{k: tupled(v) for k, v in x.items()}) for x in values["slopes"]
        )
        values["effects"] = tuple(
            Effect(**{k: tupled(v) for k, v in x.items()}) for x in values["effects"]
        )
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class CountData:
    """A table turned into a :class:`CountRegression` and its :class:`~hbjax.UnitRows`.

    Attributes:
        model: the model.
        rows: host rows (pass to :func:`hbjax.fit` in :class:`hbjax.FullBatch` or
            :class:`hbjax.Minibatches`).
        units: the unit labels (unit ``i`` is ``units[i]``).
        levels: per group level, its labels.
        cells: per effect, its cells' labels.
        period: ``[row]`` each row's period code (in the order of ``rows``), or ``None``.
        periods: the period labels, or ``None``.
        spec: how the table became the model (``None`` when built by hand).
    """

    model: CountRegression
    rows: UnitRows | None
    units: pd.Index
    levels: dict[str, pd.Index]
    cells: dict[str, pd.Index]
    period: np.ndarray | None = None
    periods: pd.Index | None = None
    spec: CountSpec | None = None

    def grid(
        self, mesh: Mesh, *, n_blocks: int | None = None, cell_chunk: int | None = None
    ) -> CountGrid:
        """The rows placed on ``mesh`` as a ``[unit, period]`` grid (the fast layout).

        ``n_blocks`` and ``cell_chunk``: as :func:`~hbjax.counts.grid.place_grid` says.

        Raises:
            GridError: no ``period=`` was given, or a unit has two rows in a period; fit
                ``rows`` instead.
        """
        if self.period is None:
            raise GridError("the grid needs each row's period: from_frame(..., period=column).")
        unit = np.asarray(self.rows.unit)
        pair = np.sort(unit.astype(np.int64) * len(self.periods) + self.period)
        twice = np.flatnonzero(np.diff(pair) == 0)
        if len(twice):
            first = pair[twice[0]]
            u, t = divmod(int(first), len(self.periods))
            raise GridError(
                f"unit {shown(self.units[u])} has more than one row in period "
                f"{shown(self.periods[t])}; the grid holds one per unit and period (fit the "
                "rows instead, or add the rows up)."
            )
        return place_grid(
            self.model,
            self.rows,
            self.period,
            len(self.periods),
            mesh,
            n_blocks=n_blocks,
            cell_chunk=cell_chunk,
        )

    @property
    def on_disk(self) -> bool:
        """Whether the rows are memory-mapped files (:func:`hbjax.counts.prepare`)."""
        return self.rows is not None and isinstance(self.rows.unit, np.memmap)

    @property
    def grid_fill(self) -> float:
        """Rows per unit x period cell (0 without ``period=``)."""
        if self.period is None:
            return 0.0
        return len(self.period) / max(self.model.n_units * len(self.periods), 1)

    def labels(self, level: str) -> pd.Index:
        """The labels of ``"unit"``, a group level or ``"global"``."""
        if level == UNIT:
            return self.units
        if level == GLOBAL:
            return pd.Index(["global"])
        return self.levels[level]

    def summary(
        self, guide: object, *, draws: int = 1000, key: jax.Array | None = None
    ) -> dict[str, pd.DataFrame]:
        """Posterior mean, sd, 5%, 50% and 95% quantiles of every value, on its labels.

        Keys: ``"<covariate>/<level>"`` for slopes (``global``, each level, ``unit``),
        ``"intercept"``, ``"effect/<name>"``, ``"dispersion"``,
        ``"dispersion/<level>"``, ``"zero_inflation"``; each table's ``attrs["summary"]``
        says how it was computed.

        Exact for a Gaussian guide (:attr:`exact_for`): every value is affine in the
        latents, or a monotone function of an affine one (``phi = exp(log phi)``, the
        zero share ``sigmoid(logit)``), so quantiles are the normal's, transformed; the
        dispersions' means and sds are the log-normal's, the zero share's by quadrature.
        Otherwise from ``draws`` guide draws (Monte Carlo sd of a mean:
        ``sd / sqrt(draws)``).
        """
        moments = self.exact_for(guide)
        if moments is not None:
            return self._tables(_exact_stats(*moments), "exact (Gaussian guide)")
        key = jax.random.key(0) if key is None else key
        natural = self.natural_draws(guide, draws, key)
        return self._tables(
            jax.tree.map(lambda v: draw_summary(v.reshape(draws, -1)), natural),
            f"monte carlo ({draws} draws)",
        )

    def exact_for(self, guide: object) -> tuple[CountLatents, CountLatents] | None:
        """Exact means and sds of :meth:`CountRegression.linear_values` under ``guide``.

        ``None`` when the guide is not Gaussian (or the values are not affine in its
        latents): :meth:`summary` then draws.
        """
        if not isinstance(guide, GaussianGuide):
            return None
        return linear_moments(guide, self.model.linear_values)

    def natural_draws(self, guide: object, draws: int, key: jax.Array) -> CountLatents:
        """``draws`` guide draws of every natural value (leading axis ``draw``; host arrays)."""
        natural = jax.jit(jax.vmap(self.model.natural))(sample_once(guide, draws, key))
        return jax.tree.map(np.asarray, natural)

    def labelled(self, values: CountLatents) -> dict[str, tuple[object, pd.Index]]:
        """Each of ``values``' entries by its :meth:`summary` name, with its labels."""
        out: dict[str, tuple[object, pd.Index]] = {}
        for covariate, levels in values.slopes.items():
            for level, value in levels.items():
                out[f"{covariate}/{level}"] = value, self.labels(level)
        out["intercept"] = values.intercept, self.units
        for name, value in values.effects.items():
            out[f"effect/{name}"] = value, self.cells[name]
        if values.dispersion is not None:
            out["dispersion"] = values.dispersion, pd.Index(["global"])
        if values.group_dispersion is not None:
            level = self.model.dispersion_level
            out[f"dispersion/{level}"] = values.group_dispersion, self.levels[level]
        if values.zero_inflation is not None:
            out["zero_inflation"] = values.zero_inflation, pd.Index(["global"])
        for covariate, levels in (values.spreads or {}).items():
            for level, value in levels.items():
                out[f"{covariate}/{level} sd"] = value, pd.Index(["sd"])
        return out

    def _tables(self, stats: CountLatents, method: str) -> dict[str, pd.DataFrame]:
        """Labelled tables from per-value statistics (dicts of ``mean, sd, q..``).

        Each table's ``attrs["summary"]`` says how they were computed (``method``).
        """
        tables: dict[str, pd.DataFrame] = {}
        for name, (values, labels) in self.labelled(stats).items():
            columns = {k: np.asarray(v, np.float64).reshape(-1) for k, v in values.items()}
            tables[name] = pd.DataFrame(columns, index=labels)
            tables[name].attrs["summary"] = method
        return tables


def _exact_stats(mean: CountLatents, sd: CountLatents) -> CountLatents:
    """Per value: the summary of a normal, or of its exp or sigmoid (see ``summary``)."""
    stats = jax.tree.map(gaussian_summary, mean, sd)
    if mean.dispersion is not None:
        stats = eqx.tree_at(
            lambda s: s.dispersion, stats, _log_normal(mean.dispersion, sd.dispersion)
        )
    if mean.group_dispersion is not None:
        stats = eqx.tree_at(
            lambda s: s.group_dispersion,
            stats,
            _log_normal(mean.group_dispersion, sd.group_dispersion),
        )
    if mean.zero_inflation is not None:
        stats = eqx.tree_at(
            lambda s: s.zero_inflation,
            stats,
            _logit_normal(mean.zero_inflation, sd.zero_inflation),
        )
    if mean.spreads is not None:
        spreads = jax.tree.map(_log_normal, mean.spreads, sd.spreads)
        stats = eqx.tree_at(lambda s: s.spreads, stats, spreads)
    return stats


def _log_normal(m: np.ndarray, s: np.ndarray) -> dict[str, np.ndarray | np.floating]:
    """``exp(N(m, s^2))``: mean, sd, quantiles."""
    m, s = np.asarray(m, np.float64), np.asarray(s, np.float64)
    out = {k: np.exp(v) for k, v in gaussian_summary(m, s).items() if k not in ("mean", "sd")}
    mean = np.exp(m + 0.5 * s * s)
    return {"mean": mean, "sd": mean * np.sqrt(np.expm1(s * s)), **out}


def _logit_normal(m: np.ndarray, s: np.ndarray) -> dict[str, np.ndarray | np.floating]:
    """``sigmoid(N(m, s^2))``: quantiles exact, mean and sd by quadrature."""
    m, s = np.asarray(m, np.float64), np.asarray(s, np.float64)
    out = {
        k: 1.0 / (1.0 + np.exp(-v))
        for k, v in gaussian_summary(m, s).items()
        if k not in ("mean", "sd")
    }
    # the trapezoid rule over +-12 sd: exact to float64 for this smooth, fast-decaying
    # integrand (Gauss-Hermite nodes converge slowly once sd is a few units)
    u = np.linspace(-12.0, 12.0, 2401)
    weights = np.exp(-0.5 * u * u) * (u[1] - u[0]) / np.sqrt(2.0 * np.pi)
    p = 1.0 / (1.0 + np.exp(-(m[..., None] + s[..., None] * u)))
    mean, second = np.sum(weights * p, axis=-1), np.sum(weights * p * p, axis=-1)
    return {"mean": mean, "sd": np.sqrt(np.maximum(second - mean * mean, 0.0)), **out}


def price_slope(data: CountData) -> Slope | None:
    """The first per-unit log slope (the price, whose slopes are elasticities), or ``None``."""
    spec = data.spec
    slopes = () if spec is None else spec.slopes
    return next((s for s in slopes if s.log and UNIT in s.over), None)


def elasticity_terms(
    price: str, groups: Sequence[str], period: str, covariates: Sequence[str] = ()
) -> tuple[list[Slope], list[Effect]]:
    """The article's terms over any group levels, plus covariates.

    The log-price slope by unit and by every group level (prior ``N(-2, 1)`` globally, sd 1
    per level and 2 per unit, as the article's), each covariate's slope by the coarsest
    group, and (coarsest group x period) effects with sd 3. With ``groups=("category",)``
    and no covariates this is the article's model (its formula, tested against scipy).
    """
    groups = tuple(groups)
    top = groups[-1:]
    price_slope = Slope(
        price,
        log=True,
        over=("unit", *groups),
        prior=(-2.0, 1.0),
        scales=(2.0,) + (1.0,) * len(groups),
    )
    slopes = [price_slope, *(Slope(c, over=top) for c in covariates)]
    return slopes, [Effect((*top, period), scale=3.0)]


def from_frame(
    frame: pd.DataFrame,
    *,
    unit: str,
    counts: str,
    groups: Sequence[str] = (),
    slopes: Sequence[Slope] = (),
    effects: Sequence[Effect] = (),
    offset: str | None = None,
    period: str | None = None,
    likelihood: str | AbstractCountLikelihood = "poisson",
    dispersion_by: str | None = None,
    zero_inflation: bool | tuple[float, float] = False,
    hierarchy: str | AbstractHierarchy = "centred",
    intercept: tuple[float, float] = (0.0, 3.0),
    intercept_prior: str = "reference",
    centre: bool = True,
    clip_log_rate: tuple[float, float] | None = None,
    learn_spreads: bool = False,
    one_row_per_period: bool = False,
) -> CountData:
    """A :class:`CountRegression` and its rows from a table of counts.

    Args:
        frame: one row per observation.
        unit: the unit column (e.g. product); units are what minibatches draw.
        counts: the count column (whole numbers >= 0).
        groups: group columns, finest first (e.g. ``("subcategory", "category")``); each
            unit belongs to one group per level and each group to one group of the next.
        slopes: the covariates (:class:`Slope`).
        effects: additive effects (:class:`Effect`).
        offset: a column added to the log rate (e.g. log exposure), or ``None``.
        period: the time column (e.g. week), or ``None``. With it, and one row per unit and
            period, the data can also sit on the fast grid layout (:meth:`CountData.grid`).
        likelihood: ``"poisson"``, ``"negbin"`` or a likelihood module.
        dispersion_by: a group level with its own dispersion (negative binomial).
        zero_inflation: ``True`` (prior ``N(-2, 2)`` on the logit of the structural-zero
            share), ``(mean, sd)`` of that prior, or ``False``.
        hierarchy: ``"centred"`` (default: much data per value) or ``"noncentred"``, or
            the :mod:`hbjax.vi.layers` module itself.
        intercept: ``(mean, sd)`` of the intercepts' prior.
        intercept_prior: ``"reference"``: the prior sits on each unit's log rate at its
            mean covariates (weighted by ``counts + 1/2``), free of the covariates' units;
            ``"zero"``: at covariates 0 (the article's).
        centre: take each unit's intercept at its mean covariates (weighted as above;
            default), nearly uncorrelated with its slopes a posteriori, or at covariates 0
            (``False``: the article's parametrisation; a covariate that is not logged at
            its mean over the rows). The same model either way.
        clip_log_rate: ``(lo, hi)`` to clip the log rate to (the article's ``(-4, 20)``),
            or ``None`` (default). A clipped model is fitted on rows, not the grid.
        learn_spreads: learn each slope level's sd (its ``scales`` entry becomes the sd of
            a half-normal prior on it; :mod:`hbjax.counts.slopes`), reported as
            ``"<covariate>/<level> sd"``; centred hierarchy only. Default: fixed sds.
        one_row_per_period: refuse a unit with two rows in one period (a table of weekly
            sales), naming them.

    Warns:
        DataWarning: labels with spaces around them; units whose covariate never changes
            (a per-unit slope then comes from its groups and prior); groups of the finest
            level with one unit; no counts above 0.

    Raises:
        DataValidationError: a missing column, a bad value, a broken nesting, fewer than
            two units (or periods), a unit twice in a period with ``one_row_per_period``:
            each named, with the fix.
    """
    from .reader import read_chunks, warn_weak

    if not isinstance(frame, pd.DataFrame):
        raise DataValidationError(
            f"expected a pandas DataFrame, got {type(frame).__name__}; use "
            "hbjax.counts.from_file(path, ...) or hbjax.io.tables.read_table(path) for CSV or "
            "Parquet files."
        )
    options, likelihood = checked_model_options(
        likelihood=likelihood,
        dispersion_by=dispersion_by,
        zero_inflation=zero_inflation,
        hierarchy=hierarchy,
        intercept=intercept,
        intercept_prior=intercept_prior,
        centre=centre,
        clip_log_rate=clip_log_rate,
        learn_spreads=learn_spreads,
    )
    spec = CountSpec(
        unit=unit,
        counts=counts,
        groups=tuple(groups),
        slopes=tuple(slopes),
        effects=tuple(effects),
        offset=offset,
        period=period,
        **options,
    )
    data, labels = read_chunks(
        lambda: [frame], spec, one_row_per_period=one_row_per_period, likelihood=likelihood
    )
    warn_weak(spec, labels)  # the table is sound: now what it says little about
    return data


def checked_model_options(
    *,
    likelihood: str | AbstractCountLikelihood = "poisson",
    dispersion_by: str | None = None,
    zero_inflation: bool | tuple[float, float] | None = False,
    hierarchy: str | AbstractHierarchy = "centred",
    intercept: tuple[float, float] = (0.0, 3.0),
    intercept_prior: str = "reference",
    centre: bool = True,
    clip_log_rate: tuple[float, float] | None = None,
    learn_spreads: bool = False,
) -> tuple[dict[str, object], AbstractCountLikelihood]:
    """:func:`from_frame`'s model options checked: the spec's fields and the likelihood.

    Raises:
        ValueError: an unknown hierarchy, intercept prior or likelihood, or a bad clip.
    """
    hierarchy = as_hierarchy(hierarchy).name
    if hierarchy not in HIERARCHIES:  # the spec records a name it can rebuild from
        raise ValueError(f"hierarchy must be one of {', '.join(HIERARCHIES)}; got {hierarchy!r}.")
    if intercept_prior not in INTERCEPT_PRIORS:
        raise ValueError(f"intercept_prior must be 'reference' or 'zero'; got {intercept_prior!r}.")
    likelihood = make_likelihood(likelihood)
    if learn_spreads and hierarchy != "centred":
        raise ValueError(
            "learn_spreads needs hierarchy='centred' (a non-centred value, parent + sd x "
            "latent, is no longer affine in the latents once the sd is one)."
        )
    if zero_inflation is True:
        zero_inflation = (-2.0, 2.0)
    fields = {
        "likelihood": likelihood.name,
        "dispersion_by": dispersion_by,
        "zero_inflation": tuple(zero_inflation) if zero_inflation else None,
        "hierarchy": hierarchy,
        "intercept": tuple(intercept),
        "intercept_prior": intercept_prior,
        "centre": bool(centre),
        "clip_log_rate": checked_clip(clip_log_rate),
        "learn_spreads": bool(learn_spreads),
    }
    return fields, likelihood


def from_file(
    path: str | os.PathLike[str], *, unit: str, counts: str, **arguments: object
) -> CountData:
    """A CSV or Parquet file's :class:`CountData`: :func:`from_frame` of :func:`read_frame`.

    ``unit``, ``counts`` and ``arguments`` are :func:`from_frame`'s. Label columns (the
    unit, the groups, the effects') are read from a CSV as text exactly as written (``01``
    is not ``1``, ``NA`` is a label, a 20-digit barcode keeps its digits); the period as
    integers or dates.
    """
    labels = CountSpec(
        unit=unit,
        counts=counts,
        groups=tuple(arguments.get("groups", ())),
        effects=tuple(arguments.get("effects", ())),
        period=arguments.get("period"),
    ).label_columns()
    frame = read_frame(path, labels=labels, period=arguments.get("period"))
    return from_frame(frame, unit=unit, counts=counts, **arguments)


def read_frame(
    path: str | os.PathLike[str], *, labels: Sequence[str], period: str | None
) -> pd.DataFrame:
    """A table as :func:`from_file` reads it: ``labels`` as text, ``period`` parsed."""
    frame = read_table(path, labels=list(labels))
    if period is not None and period in frame.columns:
        frame[period] = period_values(frame, period)
    return frame


def check_spec(spec: CountSpec) -> None:
    """Levels, slopes and names used consistently: what no table can mend, checked once.

    Raises:
        DataValidationError: the first inconsistency, named, with the fix.
    """
    groups, unit = spec.groups, spec.unit
    kept = [g for g in groups if g in (UNIT, GLOBAL)]
    if kept:
        raise DataValidationError(
            f"a group column may not be named {kept[0]!r}: hbjax names its levels 'unit' (each "
            f"unit) and 'global' (the top); rename the column, e.g. "
            f"df.rename(columns={{{kept[0]!r}: {kept[0] + '_group'!r}}})."
        )
    if len(set(groups)) != len(groups) or unit in groups:
        raise DataValidationError(
            f"groups must be distinct columns other than the unit; got {groups}."
        )
    names = [s.name for s in spec.slopes]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        columns = [s.column for s in spec.slopes if s.name == twice]
        if len(set(columns)) > 1:  # a column named like another's log, e.g. log_price
            raise DataValidationError(
                f"column {twice!r} has the name hbjax gives the log of column "
                f"{next(c for c in columns if c != twice)!r}; rename it (e.g. "
                f"df.rename(columns={{{twice!r}: {twice + '_column'!r}}}))."
            )
        raise DataValidationError(f"two slopes share a name ({names}); give each covariate once.")
    allowed = (UNIT, *groups)
    for slope in spec.slopes:
        unknown = [level for level in slope.over if level not in allowed]
        if unknown:
            raise DataValidationError(
                f"slope of {slope.name!r}: over= names {unknown[0]!r}, which is neither 'unit' "
                f"nor one of groups= {list(groups)}."
            )
        order = [allowed.index(level) for level in slope.over]
        if order != sorted(set(order)):
            raise DataValidationError(
                f"slope of {slope.name!r}: over= must run from fine to coarse without "
                f"repeats, in the order of 'unit' then groups= {list(groups)}; got {slope.over}."
            )
        if slope.scales is not None and len(slope.scales) != len(slope.over):
            raise DataValidationError(
                f"slope of {slope.name!r}: scales= needs one sd per entry of over= "
                f"({len(slope.over)}); got {len(slope.scales)}."
            )
    if spec.dispersion_by is not None and spec.dispersion_by not in groups:
        raise DataValidationError(
            f"dispersion_by={spec.dispersion_by!r} must be one of groups= {list(groups)}."
        )


def check_columns(frame: pd.DataFrame, spec: CountSpec) -> None:
    """A non-empty chunk of the table with every column ``spec`` names, no label missing."""
    if len(frame) == 0:
        raise DataValidationError("the table is empty; it needs at least one row.")
    if frame.columns.duplicated().any():
        twice = frame.columns[frame.columns.duplicated()][0]
        raise DataValidationError(f"the table has two columns named {twice!r}; rename one of them.")
    effects = [c for e in spec.effects for c in e.labels]
    period = [] if spec.period is None else [spec.period]
    named = {
        "unit": [spec.unit],
        "counts": [spec.counts],
        "groups": list(spec.groups),
        "slopes": [s.column for s in spec.slopes],
        "effects": effects,
        "offset": [] if spec.offset is None else [spec.offset],
        "period": period,
    }
    for role, columns in named.items():
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise DataValidationError(
                f"missing column {missing[0]!r} ({role}); the table has columns "
                f"{list(map(str, frame.columns))}."
            )
    for column in dict.fromkeys((spec.unit, *spec.groups, *effects, *period)):
        missing = frame[column].isna().to_numpy()
        if missing.any():
            raise DataValidationError(
                f"column {column!r} has missing labels in {which_rows(frame, missing)}; fill or "
                "drop those rows."
            )


def _levels(
    frame: pd.DataFrame, unit: str, unit_codes: np.ndarray, n_units: int, groups: tuple[str, ...]
) -> tuple[dict, dict]:
    """Each level's labels and each unit's code at every level; the nesting checked."""
    level_codes, labels, unit_level = {}, {}, {}
    for finer, group in zip((unit, *groups), groups, strict=False):
        codes, labels[group] = factorize(frame[group])
        level_codes[group] = codes
        per_unit = np.full(n_units, -1, np.int32)
        per_unit[unit_codes] = codes
        conflict = codes != per_unit[unit_codes]
        if conflict.any():
            bad = frame[unit].to_numpy()[conflict][0]
            raise DataValidationError(
                f"unit {shown(bad)} (column {unit!r}) appears in more than one group (column "
                f"{group!r}) in {which_rows(frame, conflict)}; each unit needs one {group!r}."
            )
        unit_level[group] = per_unit
        if finer != unit:  # each finer group within one of this level's
            parent = np.full(len(labels[finer]), -1, np.int32)
            parent[level_codes[finer]] = codes
            broken = codes != parent[level_codes[finer]]
            if broken.any():
                bad = labels[finer][level_codes[finer][broken][0]]
                raise DataValidationError(
                    f"{finer!r} {shown(bad)} lies in more than one {group!r} "
                    f"({which_rows(frame, broken)}); groups= must nest, finest first."
                )
    return labels, unit_level


def _finite(frame: pd.DataFrame, column: str) -> np.ndarray:
    values = numeric_column(frame, column)
    bad = ~np.isfinite(values)
    if bad.any():
        raise DataValidationError(
            f"column {column!r} must be finite; found {shown(values[bad][0])} in "
            f"{which_rows(frame, bad)}. Drop or fill those rows."
        )
    huge = np.abs(values) > np.finfo(np.float32).max
    if huge.any():
        raise DataValidationError(
            f"column {column!r} holds values beyond float32, the fit's precision "
            f"({shown(values[huge][0])} in {which_rows(frame, huge)}); rescale the column "
            "(e.g. thousands) or fix those rows."
        )
    return values


def _covariate(frame: pd.DataFrame, slope: Slope) -> np.ndarray:
    values = _finite(frame, slope.column)
    if slope.log:
        bad = ~(values > 0)
        if bad.any():
            raise DataValidationError(
                f"column {slope.column!r} must be > 0 (its log is used); found "
                f"{shown(values[bad][0])} in {which_rows(frame, bad)}."
            )
        values = np.log(values)
    return values


def _cells(frame: pd.DataFrame, effect: Effect) -> tuple[np.ndarray, pd.Index]:
    """Each row's cell of ``effect`` and the cells' labels (sorted where they can be)."""
    if len(effect.labels) == 1:
        return factorize(frame[effect.labels[0]])
    keys = frame[list(effect.labels)]
    try:
        grouped = keys.groupby(list(effect.labels), sort=True, observed=True)
        codes = grouped.ngroup().to_numpy()
    except TypeError:  # labels of mixed types cannot be sorted
        grouped = keys.groupby(list(effect.labels), sort=False, observed=True)
        codes = grouped.ngroup().to_numpy()
    labels = pd.MultiIndex.from_tuples(list(grouped.groups.keys()), names=effect.labels)
    return codes.astype(np.int32), labels


def effect_level(spec: CountSpec, effect: Effect) -> str | None:
    """The finest group level among ``effect``'s labels (``None``: none is a level).

    A unit has rows only in cells of its own group there, so the group's mean effect and
    its units' intercepts are one direction the data cannot tell apart
    (:class:`~hbjax.counts.regression.EffectLevels`).
    """
    return next((g for g in spec.groups if g in effect.labels), None)


def cell_groups(
    spec: CountSpec, cells: dict[str, pd.Index], levels: dict[str, pd.Index]
) -> dict[str, np.ndarray]:
    """Per effect, ``[cell]`` each cell's group at :func:`effect_level` (0: one group)."""
    out = {}
    for effect in spec.effects:
        level, labels = effect_level(spec, effect), cells[effect.name]
        if level is None:
            out[effect.name] = np.zeros(len(labels), np.int32)
            continue
        of_cell = labels.get_level_values(level) if labels.nlevels > 1 else labels
        codes = levels[level].get_indexer(of_cell)
        if len(codes) and codes.min() < 0:  # the reader makes both from one table
            raise ValueError(f"a cell of {effect.name!r} has a {level!r} the table lacks.")
        out[effect.name] = codes.astype(np.int32)
    return out


def build_model(
    spec: CountSpec,
    table: UnitTable,
    level_sizes: dict[str, int],
    cell_sizes: dict[str, int],
    likelihood: AbstractCountLikelihood | None = None,
    groups: dict[str, np.ndarray] | None = None,
    standard: dict[str, tuple[float, float]] | None = None,
) -> CountRegression:
    """The model ``spec`` describes, over ``table``'s units.

    Parent maps come from ``table.levels`` (each unit's code at every level); ``groups``:
    each effect's cells' groups (:func:`cell_groups`); ``standard``: each covariate's
    ``(mean, sd)`` over the rows (:class:`~hbjax.counts.CountRegression`'s ``standard``).
    With zero arrays (and no ``groups``) this is the template a saved fit's arrays are
    read into.
    """
    mode = as_hierarchy(spec.hierarchy)
    unit_level = {g: np.asarray(codes) for g, codes in table.levels.items()}
    layers = {
        s.name: _slope_layer(s, level_sizes, unit_level, mode, learned=spec.learn_spreads)
        for s in spec.slopes
    }
    splits = {}
    for effect in spec.effects:
        level = effect_level(spec, effect)
        key = np.zeros(cell_sizes[effect.name], np.int32) if groups is None else groups[effect.name]
        splits[effect.name] = EffectLevels(level, key, 1 if level is None else level_sizes[level])
    return CountRegression(
        table,
        level_sizes,
        slopes=layers,
        effects={e.name: Normal(0.0, float(e.scale), (cell_sizes[e.name],)) for e in spec.effects},
        effect_levels=splits,
        intercept=spec.intercept,
        likelihood=likelihood if likelihood is not None else make_likelihood(spec.likelihood),
        dispersion_level=spec.dispersion_by,
        zero_inflation=spec.zero_inflation,
        clip_log_rate=spec.clip_log_rate,
        centre_covariates=spec.centre,
        standard=standard,
    )


def _slope_layer(
    slope: Slope,
    level_sizes: dict[str, int],
    unit_level: dict[str, np.ndarray],
    mode: AbstractHierarchy,
    *,
    learned: bool = False,
) -> HierarchicalSlope:
    """The slope's layer: its group levels' sizes, parent maps and scales (or priors)."""
    scales = tuple(slope.scales) if slope.scales is not None else (1.0,) * len(slope.over)
    per_unit = bool(slope.over) and slope.over[0] == UNIT
    group_levels = slope.over[1:] if per_unit else slope.over
    group_scales = scales[1:] if per_unit else scales
    parents = []
    for finer, coarser in zip(group_levels, group_levels[1:], strict=False):
        parent = np.zeros(level_sizes[finer], np.int32)
        parent[unit_level[finer]] = unit_level[coarser]  # every group has a unit
        parents.append(parent)
    return HierarchicalSlope(
        slope.prior,
        levels=group_levels,
        parents=tuple(parents),
        sizes=tuple(level_sizes[g] for g in group_levels),
        scales=group_scales,
        unit_scale=scales[0] if per_unit else None,
        hierarchy=mode,
        learned=learned and bool(slope.over),
    )


__all__ = [
    "HIERARCHIES",
    "check_columns",
    "check_spec",
    "price_slope",
    "CountData",
    "CountSpec",
    "build_model",
    "cell_groups",
    "Effect",
    "effect_level",
    "Slope",
    "elasticity_terms",
    "from_file",
    "from_frame",
    "read_frame",
]
