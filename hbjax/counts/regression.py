"""A hierarchical count regression assembled from layers: the model vocabulary.

For row ``r`` of unit ``i``::

    log E[y_r] = a_i + sum_k b_k(i) (x_rk - c_ik) + sum_e g_e[cell_e(r)] + offset_r

- ``a_i``: the unit's intercept, taken at the unit's covariate centres ``c_i`` (e.g. its
  mean log price; a shift of the usual intercept ``d_i = a_i - sum_k b_k(i) c_ik`` that
  makes it nearly uncorrelated with the slopes a posteriori). Its prior
  ``N(loc, scale)`` sits on the log demand at the reference covariates ``r_i``:
  ``d_i + sum_k b_k(i) r_ik`` (``r = c`` by default; ``r = 0`` is the article's prior);
- ``b_k``: covariate ``k``'s slope (:class:`~hbjax.counts.slopes.HierarchicalSlope`):
  fixed, or varying over any nesting of group levels and optionally by unit;
- ``g_e``: additive effects over cells of labels (category x week, store x week, ...),
  ``g ~ N(0, scale)``;
- the count likelihood: Poisson, or negative binomial with a global dispersion or one per
  group of a level (``log phi_g ~ N(log phi, dispersion_scale)``), optionally
  zero-inflated (``P(structural zero) = sigmoid(w)``, ``w ~ N(loc, scale)``).

The data identify only ``a_i + g_e[c]``: shifting an effect's cells of one group (the
cells of a category, over the weeks) by ``m`` and the group's intercepts by ``-m`` leaves
every rate as it was, so a guide that is independent across intercepts and effects puts
the uncertainty of that shift in the wrong place (too narrow for each part, too wide for
their sum). The latents therefore carry each group's *level* of an effect with the
intercepts (:class:`EffectLevels`): an effect's cells are ``scale x H z``, with ``H`` an
orthonormal reflection per group whose first coordinate is the group's mean, and the
intercept latent is ``a_i`` plus the mean effect of its groups. A linear map with a
constant Jacobian: the model, its posterior and every reported value (on the natural
scale) are unchanged; what changes is which directions a guide's factors follow.

Covariates are standardised inside the model (``standard``: each column's mean ``m_k``
and sd ``s_k`` over the rows; a logged covariate keeps ``(0, 1)``): a slope's layer holds
``s_k b_k``, the slope per sd of its column, so its prior and its levels' scales are per
sd (rstanarm's autoscaling: a column in centimetres or metres gives one fit, and a
shelf length of 1,000 cannot overflow the first step), and the log rate uses
``(x - c_ik) / s_k``. Uncentred, the intercept latent sits at ``m_k`` (``0`` for a logged
covariate, the article's). Slopes are reported per unit of the column.

It is an :class:`~hbjax.AbstractRowModel` over :class:`~hbjax.UnitRows`, so it is
sharded over devices and minibatched by whole units like any row model. Its rows'
``columns`` are ``{"counts": [row], "log_factorial": [row], "x": {name: [row]},
"cells": {effect: [row] int}}`` and optionally ``"offset": [row]``
(:func:`hbjax.counts.from_frame` builds them from a table).
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, Scalar

from .._types import LatentLeaf, float_dtype
from ..parallel.rows import AbstractRowModel, UnitRows
from ..vi.layers import HALF_LOG_2PI, Normal
from ..vi.model import ParentLink
from .families import AbstractCountLikelihood, checked_clip, make_likelihood
from .grid import CountGrid, grid_log_likelihood
from .slopes import GLOBAL, UNIT, HierarchicalSlope

_SUM_ROWS = 1 << 24  # rows summed at once by init_latents


class CountLatents(eqx.Module):
    """Latents (or natural values) of a :class:`CountRegression`.

    Attributes:
        slopes: per covariate, the slope's latents (``{"global", level..., "unit"}``).
        intercept: ``[unit]`` intercepts.
        effects: per effect, ``[cell]``.
        dispersion: ``[]`` the negative binomial's (global) dispersion; ``None`` else.
        group_dispersion: ``[group]`` per-group dispersions; ``None`` without them.
        zero_inflation: ``[]`` the structural-zero share; ``None`` without it.
        spreads: per covariate with learned spreads, ``{level: [], ..., "unit": []}``
            (latents ``log(sd / scale)``, values the sds); ``None`` without any.
    """

    slopes: dict[str, dict[str, LatentLeaf]]
    intercept: Float[LatentLeaf, "*p unit"]
    effects: dict[str, LatentLeaf]
    dispersion: LatentLeaf | None = None
    group_dispersion: LatentLeaf | None = None
    zero_inflation: LatentLeaf | None = None
    spreads: dict[str, dict[str, LatentLeaf]] | None = None


class EffectLevels(eqx.Module):
    """An effect's cells in groups: each group's mean apart from the deviations from it.

    Within each group of ``n`` cells, ``H`` is the Householder reflection that swaps the
    group's first cell with ``1 / sqrt(n)`` on each of its cells: orthonormal, so
    ``g = loc + scale x H z`` with ``z ~ N(0, 1)`` is the layer's ``N(loc, scale)`` prior
    cell by cell, and the group's mean effect is ``loc + scale x z[first] / sqrt(n)``.
    ``O(cells)``: one segment sum for ``H z``, a gather for the means; a group of one cell
    is its own level (``H = 1``).

    Attributes:
        level: the group level of the model's table the groups are (``None``: one group).
        key: ``[cell]`` each cell's group.
        v: ``[cell]`` the reflection's vector, ``[first] - 1 / sqrt(n)``.
        coef: ``[cell]`` ``2 v / (v . v)`` of the cell's group (0 for a lone cell).
        first: ``[group]`` each group's first cell (0 for a group without cells).
        inv_sqrt: ``[group]`` ``1 / sqrt(n)`` (0 for a group without cells).
        n_groups: groups.
    """

    level: str | None = eqx.field(static=True)
    key: Int[Array, " cell"]
    v: Float[Array, " cell"]
    coef: Float[Array, " cell"]
    first: Int[Array, " group"]
    inv_sqrt: Float[Array, " group"]
    n_groups: int = eqx.field(static=True)

    def __init__(self, level: str | None, key: Int[np.ndarray, " cell"], n_groups: int):
        """Groups of cells: ``key[c]`` is cell ``c``'s group, ``0 .. n_groups - 1``."""
        key = np.asarray(key, np.int64)
        if len(key) and (key.min() < 0 or key.max() >= n_groups):
            raise ValueError(f"cell groups must be 0..{n_groups - 1}; got {key.min()}..{key.max()}")
        size = np.bincount(key, minlength=n_groups).astype(np.float64)
        inv_sqrt = np.where(size > 0, 1.0 / np.sqrt(np.maximum(size, 1.0)), 0.0)
        groups, first = np.unique(key, return_index=True)
        is_first = np.zeros(len(key))
        is_first[first] = 1.0
        v = is_first - inv_sqrt[key]
        vv = 2.0 - 2.0 * inv_sqrt[key]  # v . v of the cell's group
        coef = np.where(vv > 0, 2.0 * v / np.where(vv > 0, vv, 1.0), 0.0)
        first_of = np.zeros(n_groups, np.int64)
        first_of[groups] = first
        self.level, self.n_groups = level, int(n_groups)
        self.key = jnp.asarray(key, jnp.int32)
        self.v, self.coef = jnp.asarray(v, float_dtype()), jnp.asarray(coef, float_dtype())
        self.first = jnp.asarray(first_of, jnp.int32)
        self.inv_sqrt = jnp.asarray(inv_sqrt, float_dtype())

    def reflect(self, z: Float[Array, "*p cell"]) -> Float[Array, "*p cell"]:
        """``H z``, group by group."""
        moved = jnp.moveaxis(self.v * z, -1, 0)
        dot = jnp.moveaxis(jax.ops.segment_sum(moved, self.key, self.n_groups), 0, -1)
        return z - self.coef * jnp.take(dot, self.key, axis=-1)

    def mean(self, z: Float[Array, "*p cell"]) -> Float[Array, "*p group"]:
        """Each group's mean of ``H z``: ``z[first] / sqrt(n)``."""
        return jnp.take(z, self.first, axis=-1) * self.inv_sqrt

    def diagonal(self, info: Float[np.ndarray, " cell"]) -> Float[np.ndarray, " cell"]:
        """``diag(H^T diag(info) H)`` with the groups' levels at 0 (host, float64).

        The Fisher information of each coordinate of ``z`` for cells of information
        ``info``; a level's is 0, as the intercepts carry it and the data do not see it.
        """
        key = np.asarray(self.key)
        v, coef = np.asarray(self.v, np.float64), np.asarray(self.coef, np.float64)
        spread = np.bincount(key, v * v * info, self.n_groups)[key]
        diagonal = info * (1.0 - 2.0 * coef * v) + coef * coef * spread
        diagonal[np.asarray(self.first)[np.asarray(self.inv_sqrt) > 0]] = 0.0
        return np.maximum(diagonal, 0.0)


class UnitTable(eqx.Module):
    """What the model knows per unit (all ``[unit]``; a batch takes them at its units).

    Attributes:
        levels: each unit's index at every group level.
        centre: per covariate, the unit's typical value ``c_i`` (its weighted mean), where
            the latent intercept is taken when the model centres (:meth:`CountRegression.
            centre`).
        reference: per covariate, ``r_i``: where the intercept's prior sits.
    """

    levels: dict[str, Int[Array, " unit"]]
    centre: dict[str, Float[Array, " unit"]]
    reference: dict[str, Float[Array, " unit"]]


class CountRegression(AbstractRowModel):
    """A hierarchical count regression (see the module docstring).

    Attributes:
        slopes: one :class:`~hbjax.counts.slopes.HierarchicalSlope` per covariate.
        intercept: the intercepts' prior layer, ``N(loc, scale)`` per unit.
        effects: one ``N(0, scale)`` layer per additive effect, shape ``[cell]``.
        effect_levels: per effect, its groups of cells whose levels the intercepts carry
            (:class:`EffectLevels`).
        likelihood: :class:`~hbjax.Poisson` or :class:`~hbjax.NegativeBinomial`.
        dispersion_level: the group level with its own dispersions, or ``None``.
        dispersion_scale: prior sd of a group's log dispersion around the global one.
        zero_inflation: prior layer of the structural zeros' logit, or ``None``.
        clip_log_rate: ``(lo, hi)`` the log rate is clipped to (the article's
            ``(-4, 20)``), or ``None``. A clipped model is fitted on rows, not the grid.
        centre_covariates: whether the intercepts are taken at ``table.centre`` (default)
            or at each covariate's mean over the rows (0 for a logged covariate: the
            article's parametrisation; the same model).
        origin, spread: per covariate, its mean and sd over the rows (see the module
            docstring; default 0 and 1: no standardisation).
        table: the per-unit arrays (:class:`UnitTable`).
        level_sizes: the number of groups at each level.
        n_units: units.
    """

    slopes: dict[str, HierarchicalSlope]
    intercept: Normal
    effects: dict[str, Normal]
    effect_levels: dict[str, EffectLevels]
    likelihood: AbstractCountLikelihood
    dispersion_level: str | None = eqx.field(static=True)
    dispersion_scale: float = eqx.field(static=True)
    zero_inflation: Normal | None
    clip_log_rate: tuple[float, float] | None = eqx.field(static=True)
    centre_covariates: bool = eqx.field(static=True)
    origin: dict[str, float]
    spread: dict[str, float]
    table: UnitTable
    level_sizes: dict[str, int] = eqx.field(static=True)
    n_units: int = eqx.field(static=True)

    def __init__(
        self,
        table: UnitTable,
        level_sizes: dict[str, int],
        *,
        slopes: dict[str, HierarchicalSlope],
        effects: dict[str, Normal] | None = None,
        effect_levels: dict[str, EffectLevels] | None = None,
        intercept: tuple[float, float] = (0.0, 3.0),
        likelihood: str | AbstractCountLikelihood = "poisson",
        dispersion_level: str | None = None,
        dispersion_scale: float = 0.5,
        zero_inflation: tuple[float, float] | None = None,
        clip_log_rate: tuple[float, float] | None = None,
        centre_covariates: bool = True,
        standard: dict[str, tuple[float, float]] | None = None,
    ):
        """Assemble the model (:func:`hbjax.counts.from_frame` does it from a table).

        Args:
            table: the per-unit arrays; ``table.centre`` and ``table.reference`` need one
                entry per slope.
            level_sizes: groups at each level named in ``table.levels``.
            slopes: per covariate (the rows' ``x`` names), its slope layer.
            effects: per effect (the rows' ``cells`` names), an ``N(0, scale)`` layer.
            effect_levels: per effect, its cells' groups at a level of ``table.levels``
                (every unit of a group only has rows in that group's cells, as a category's
                units in the category's weeks); default: all cells one group.
            intercept: ``(loc, scale)`` of the intercepts' prior.
            likelihood: ``"poisson"``, ``"negbin"`` or a likelihood module.
            dispersion_level: a level of ``table.levels`` with one dispersion per group
                (negative binomial only).
            dispersion_scale: prior sd of the groups' log dispersions around the global.
            zero_inflation: ``(loc, scale)`` of the structural zeros' logit prior, or
                ``None`` (no zero inflation).
            clip_log_rate: ``(lo, hi)`` to clip the log rate to, or ``None``.
            centre_covariates: see the attributes.
            standard: per covariate, ``(mean, sd)`` of its column over the rows (the
                attributes ``origin`` and ``spread``); default ``(0, 1)``.
        """
        units = {int(np.shape(a)[0]) for a in jax.tree.leaves(table)}
        if len(units) != 1:
            raise ValueError(f"every per-unit array needs the same length; got {sorted(units)}.")
        self.n_units = units.pop()
        for name in slopes:
            if name not in table.centre or name not in table.reference:
                raise ValueError(
                    f"covariate {name!r} needs a centre and a reference per unit in the table."
                )
        for name, slope in slopes.items():
            if slope.levels and slope.levels[0] not in table.levels:
                raise ValueError(
                    f"the slope of {name!r} varies over level {slope.levels[0]!r}, which the "
                    f"table does not have (it has {sorted(table.levels)})."
                )
        self.slopes, self.effects, self.table = dict(slopes), dict(effects or {}), table
        self.effect_levels = {
            name: EffectLevels(None, np.zeros(e.shape[0], np.int32), 1)
            for name, e in self.effects.items()
        } | dict(effect_levels or {})
        for name, split in self.effect_levels.items():
            if name not in self.effects or split.key.shape != self.effects[name].shape:
                raise ValueError(f"effect_levels[{name!r}] needs one group per cell of the effect.")
            if split.level is not None and split.level not in table.levels:
                raise ValueError(
                    f"the cells of {name!r} are grouped by {split.level!r}, which the table "
                    f"does not have (it has {sorted(table.levels)})."
                )
        self.level_sizes = {k: int(v) for k, v in level_sizes.items()}
        self.intercept = Normal(float(intercept[0]), float(intercept[1]), (self.n_units,))
        self.likelihood = make_likelihood(likelihood)
        if dispersion_level is not None:
            if self.likelihood.latent_shape() is None:
                raise ValueError(
                    f"dispersion by {dispersion_level!r} needs a likelihood with a "
                    f"dispersion (negbin); got {self.likelihood.name}."
                )
            if dispersion_level not in table.levels:
                raise ValueError(
                    f"dispersion_level {dispersion_level!r} is not a level of the table "
                    f"({sorted(table.levels)})."
                )
        self.dispersion_level, self.dispersion_scale = dispersion_level, float(dispersion_scale)
        self.zero_inflation = (
            None if zero_inflation is None else Normal(*(float(v) for v in zero_inflation), ())
        )
        self.clip_log_rate = checked_clip(clip_log_rate)
        self.centre_covariates = bool(centre_covariates)
        standard = {k: (0.0, 1.0) for k in self.slopes} | dict(standard or {})
        if set(standard) != set(self.slopes) or not all(
            np.isfinite(m) and np.isfinite(s) and s > 0 for m, s in standard.values()
        ):
            raise ValueError(
                f"standard needs a finite (mean, sd > 0) per covariate; got {standard}."
            )
        self.origin = {k: float(standard[k][0]) for k in self.slopes}
        self.spread = {k: float(standard[k][1]) for k in self.slopes}

    # --- structure -------------------------------------------------------------------
    def latent_shapes(self) -> CountLatents:
        """Shapes of the latents (see :class:`CountLatents`)."""
        scalar = jax.ShapeDtypeStruct((), float_dtype())
        groups = None
        if self.dispersion_level is not None:
            groups = jax.ShapeDtypeStruct((self.level_sizes[self.dispersion_level],), scalar.dtype)
        spreads = {k: s.spread_shapes() for k, s in self.slopes.items() if s.learned}
        return CountLatents(
            slopes={k: s.latent_shapes(self.n_units) for k, s in self.slopes.items()},
            intercept=self.intercept.latent_shape(),
            effects={k: e.latent_shape() for k, e in self.effects.items()},
            dispersion=self.likelihood.latent_shape(),
            group_dispersion=groups,
            zero_inflation=None if self.zero_inflation is None else scalar,
            spreads=spreads or None,
        )

    def _flags(
        self, *, intercept: bool, unit_slopes: bool, slope_groups: bool, dispersion: bool
    ) -> CountLatents:
        """One flag per latent leaf.

        Intercepts, per-unit slopes, slopes' other leaves and the likelihood's get the flag
        of that name (learned spreads the likelihood's: shared, reported); effects ``False``.
        """
        shapes = self.latent_shapes()

        def flag(path: tuple) -> bool:
            field = path[0].name
            if field == "slopes":
                return unit_slopes if path[-1].key == UNIT else slope_groups
            return {"intercept": intercept, "effects": False}.get(field, dispersion)

        paths, treedef = jax.tree_util.tree_flatten_with_path(shapes)
        return jax.tree.unflatten(treedef, [flag(p) for p, _ in paths])

    def unit_leaves(self) -> CountLatents:
        """Intercepts and per-unit slopes are per unit; the rest are shared."""
        return self._flags(intercept=True, unit_slopes=True, slope_groups=False, dispersion=False)

    def reported_leaves(self) -> CountLatents:
        """Slopes and the likelihood's parameters: what convergence watches, checks compare.

        Intercepts and effects are nuisance: with an effect over a group and the period
        they share a level along which the iterates wander slowly, as the elasticity
        model's intercepts and (category, period) effects do.
        """
        return self._flags(intercept=False, unit_slopes=True, slope_groups=True, dispersion=True)

    def parent_links(self) -> tuple[ParentLink, ...]:
        """What :class:`~hbjax.vi.guide.DependentNormal` couples.

        Each slope's levels under their parents, coarse to fine, its units under their
        group, the units' intercepts under the same groups, group dispersions under the
        global one. (Learned sds are no parents: a value's dependence on its level's sd is
        not linear, and linking them left the sds' intervals as narrow: 0.21x NUTS's.)
        """
        paths = jax.tree_util.tree_flatten_with_path(self.latent_shapes())[0]
        position = {jax.tree_util.keystr(p): i for i, (p, _) in enumerate(paths)}
        intercept = position[".intercept"]
        links = []
        for name, slope in self.slopes.items():
            at = {k: position[f".slopes[{name!r}][{k!r}]"] for k in (GLOBAL, *slope.levels)}
            parent, index = at[GLOBAL], None
            for j in reversed(range(len(slope.levels))):  # coarse to fine
                links.append(ParentLink(at[slope.levels[j]], parent, index))
                parent, index = at[slope.levels[j]], None if j == 0 else slope.parents[j - 1]
            if slope.per_unit:
                index = self._unit_level(slope)
                links.append(ParentLink(position[f".slopes[{name!r}][{UNIT!r}]"], parent, index))
                links.append(ParentLink(intercept, parent, index))
        if self.dispersion_level is not None:
            links.append(ParentLink(position[".group_dispersion"], position[".dispersion"]))
        return tuple(links)

    # --- values ------------------------------------------------------------------------
    def _unit_level(self, slope: HierarchicalSlope) -> Array | None:
        return self.table.levels[slope.levels[0]] if slope.levels else None

    def standard_slopes(self, latents: CountLatents) -> dict[str, Float[Array, "*p unit"]]:
        """Each covariate's slope for every unit, per sd of its column (the layers' values)."""
        n_units = jnp.shape(latents.intercept)[-1]
        out = {}
        for name, slope in self.slopes.items():
            z = latents.slopes[name]
            values = slope.group_values(z)
            out[name] = slope.unit_values(z, values, self._unit_level(slope), n_units)
        return out

    def unit_slopes(self, latents: CountLatents) -> dict[str, Float[Array, "*p unit"]]:
        """Each covariate's slope for every unit, per unit of its column (natural scale)."""
        return {k: b / self.spread[k] for k, b in self.standard_slopes(latents).items()}

    def standardised(
        self, name: str, x: Float[ArrayLike, " row"], unit: Int[ArrayLike, " row"]
    ) -> Float[Array, " row"]:
        """``(x - c) / s``: covariate ``name`` of rows of ``unit``, as the log rate uses it."""
        return (x - jnp.take(self.centre(name), unit)) / self.spread[name]

    def effect_values(self, latents: CountLatents) -> dict[str, Float[Array, "*p cell"]]:
        """Each effect's cell values (natural scale): ``loc + scale x H z``."""
        split, z = self.effect_levels, latents.effects
        return {k: e.loc + e.scale * split[k].reflect(z[k]) for k, e in self.effects.items()}

    def intercept_values(self, latents: CountLatents) -> Float[Array, "*p unit"]:
        """``[unit]`` the intercepts ``a_i``: the latent less its groups' mean effects."""
        a = self.intercept(latents.intercept)
        for name, effect in self.effects.items():
            split = self.effect_levels[name]
            level = effect.loc + effect.scale * split.mean(latents.effects[name])
            if split.level is None:
                a = a - level
            else:
                a = a - jnp.take(level, self.table.levels[split.level], axis=-1)
        return a

    def log_dispersion(self, latents: CountLatents) -> Array | None:
        """The likelihood's parameter: ``log phi`` (``[group]`` with group dispersions)."""
        parameter = self.likelihood.parameter(latents.dispersion)
        if self.dispersion_level is None or parameter is None:
            return parameter
        return parameter[..., None] + self.dispersion_scale * latents.group_dispersion

    def natural(self, latents: CountLatents) -> CountLatents:
        """Natural values of one set (or draws) of latents.

        Slopes at every level, intercepts at covariates 0 (``d_i``), effects, dispersions
        ``phi`` and the structural-zero share.
        """
        linear = self.linear_values(latents)
        return CountLatents(
            slopes=linear.slopes,
            intercept=linear.intercept,
            effects=linear.effects,
            dispersion=self.likelihood.natural(latents.dispersion),
            group_dispersion=None
            if linear.group_dispersion is None
            else jnp.exp(linear.group_dispersion),
            zero_inflation=None
            if linear.zero_inflation is None
            else jax.nn.sigmoid(linear.zero_inflation),
            spreads=None if linear.spreads is None else jax.tree.map(jnp.exp, linear.spreads),
        )

    def linear_values(self, latents: CountLatents) -> CountLatents:
        """:meth:`natural` before its last, monotone step: affine in the latents.

        As :meth:`natural`, but the likelihood's parameter (``log phi``) for the
        dispersions, the logit of the structural-zero share and the log of learned sds
        (exact summaries: :meth:`~hbjax.counts.CountData.summary`).
        """
        unit_slopes = self.unit_slopes(latents)
        slopes = {}
        for name, slope in self.slopes.items():
            values = {
                k: v / self.spread[name]
                for k, v in slope.group_values(latents.slopes[name]).items()
            }
            if slope.per_unit:
                values[UNIT] = unit_slopes[name]
            slopes[name] = values
        intercept = self.intercept_values(latents)
        for name, b in unit_slopes.items():
            intercept = intercept - b * self.centre(name)
        grouped = self.dispersion_level is not None
        spreads = None
        if latents.spreads is not None:  # log sd per unit of the column
            spreads = {}
            for k, eta in latents.spreads.items():
                logs = self.slopes[k].log_spreads(eta)
                spreads[k] = {level: v - math.log(self.spread[k]) for level, v in logs.items()}
        return CountLatents(
            slopes=slopes,
            intercept=intercept,
            effects=self.effect_values(latents),
            dispersion=self.likelihood.parameter(latents.dispersion),
            group_dispersion=self.log_dispersion(latents) if grouped else None,
            zero_inflation=None
            if self.zero_inflation is None
            else self.zero_inflation(latents.zero_inflation),
            spreads=spreads,
        )

    # --- densities ---------------------------------------------------------------------
    def shared_log_prior(self, latents: CountLatents) -> Scalar:
        """Slopes' global and group values, effects, dispersions, zero inflation."""
        total = self.likelihood.log_prior(latents.dispersion)
        for name, slope in self.slopes.items():
            z = latents.slopes[name]
            eta = self._eta(latents, name)
            total = total + slope.shared_log_prior(z, slope.group_values(z), eta)
        for name, effect in self.effects.items():
            total = total + effect.log_prior(latents.effects[name])
        if latents.group_dispersion is not None:
            total = total + Normal(0.0, 1.0).log_prior(latents.group_dispersion)
        if self.zero_inflation is not None:
            total = total + self.zero_inflation.log_prior(latents.zero_inflation)
        return total

    def unit_log_prior(self, latents: CountLatents) -> Float[Array, " unit"]:
        """``[unit]`` each unit's intercept and per-unit slopes' log priors."""
        n_units = jnp.shape(latents.intercept)[-1]
        at_reference = self.intercept_values(latents)
        total = jnp.zeros(n_units, float_dtype())
        for name, slope in self.slopes.items():
            z = latents.slopes[name]
            values = slope.group_values(z)
            level = self._unit_level(slope)
            b = slope.unit_values(z, values, level, n_units) / self.spread[name]
            shift = self.centre(name) - self.table.reference[name]
            at_reference = at_reference - b * shift
            eta = self._eta(latents, name)
            total = total + slope.unit_log_prior(z, values, level, n_units, eta)
        u = (at_reference - self.intercept.loc) / self.intercept.scale
        return total - 0.5 * u * u - HALF_LOG_2PI

    @staticmethod
    def _eta(latents: CountLatents, name: str) -> dict[str, Array] | None:
        """The learned spreads' latents of covariate ``name`` (``None``: fixed)."""
        return None if latents.spreads is None else latents.spreads.get(name)

    def centre(self, name: str) -> Float[Array, " unit"]:
        """``[unit]`` where covariate ``name``'s intercept latents sit: ``c_i`` or its mean."""
        centre = self.table.centre[name]
        return centre if self.centre_covariates else jnp.full_like(centre, self.origin[name])

    def log_rate(self, latents: CountLatents, rows: UnitRows) -> Float[Array, " row"]:
        """``[row]`` the log expected count of each row (clipped if the model says so)."""
        return self.clipped(self.linear_log_rate(latents, rows))

    def clipped(self, log_rate: Float[Array, "*rows"]) -> Float[Array, "*rows"]:
        """``log_rate`` clipped to :attr:`clip_log_rate` (itself when there is none)."""
        if self.clip_log_rate is None:
            return log_rate
        return jnp.clip(log_rate, *self.clip_log_rate)

    def linear_log_rate(self, latents: CountLatents, rows: UnitRows) -> Float[Array, " row"]:
        """``[row]`` the sum of the log rate's terms, before any clip.

        The effects the rows have cells of (all, for the rows of a table; a what-if may
        leave some out and add them itself).
        """
        unit, columns = rows.unit, rows.columns
        rate = jnp.take(self.intercept_values(latents), unit)
        for name, b in self.standard_slopes(latents).items():
            rate = rate + jnp.take(b, unit) * self.standardised(name, columns["x"][name], unit)
        effects = self.effect_values(latents)
        for name, cells in columns["cells"].items():
            rate = rate + jnp.take(effects[name], cells)
        if "offset" in columns:
            rate = rate + columns["offset"]
        return rate

    def row_log_likelihood(self, latents: CountLatents, rows: UnitRows) -> Float[Array, " row"]:
        """``[row]`` each row's log-probability (zero-inflated when the model says so)."""
        counts = rows.columns["counts"]
        parameter = self.log_dispersion(latents)
        if self.dispersion_level is not None:
            parameter = jnp.take(parameter, self.table.levels[self.dispersion_level][rows.unit])
        log_rate = self.log_rate(latents, rows)
        log_p = self.likelihood.log_kernel(log_rate, counts, parameter)
        log_p = log_p - rows.columns["log_factorial"]
        if self.zero_inflation is None:
            return log_p
        w = self.zero_inflation(latents.zero_inflation)
        log_zero, log_count = jax.nn.log_sigmoid(w), jax.nn.log_sigmoid(-w)
        return jnp.where(counts > 0, log_count + log_p, jnp.logaddexp(log_zero, log_count + log_p))

    def log_likelihood(self, latents: CountLatents, panel: UnitRows | CountGrid) -> Scalar:
        """The rows' log-likelihood: on the grid's dense kernel, or summed per row."""
        if isinstance(panel, CountGrid):
            return grid_log_likelihood(self, latents, panel)
        return super().log_likelihood(latents, panel)

    def restrict(self, units: Int[Array, " slot"]) -> CountRegression:
        """The model of a batch: per-unit arrays taken at ``units``."""
        table = jax.tree.map(lambda a: jnp.take(a, units, axis=0), self.table)
        # sizes are read off the latents, so the static unit count may stay
        return eqx.tree_at(lambda m: m.table, self, table)

    def starting_scales(self, rows: UnitRows) -> CountLatents:
        """A guide's starting sd of some latents: about their posterior sd (NaN: no guess).

        The effects' cells, from each row's Fisher information about its log rate at a
        mean equal to its count (:meth:`~hbjax.AbstractCountLikelihood.information`)
        plus the latent's standard-normal prior, through the reflection's diagonal (a
        group's level, which the data do not see, at its prior's 1); and the dispersion
        (:meth:`~hbjax.AbstractCountLikelihood.starting_scale`). A week's effect in a
        category with a best seller has a posterior sd near 0.01: from the guides' usual
        0.1, Adam takes thousands of steps to shrink it, and a fit that stops once the
        slopes have settled reported best sellers' predictions several times too wide.
        (Intercepts and slopes keep the usual start: measured, starting them at such
        guesses cost 1.5-2.7x the steps to converge on panels without best sellers.)
        """
        cell_info = {k: np.zeros(e.shape[0]) for k, e in self.effects.items()}
        for lo in range(0, len(rows.unit), _SUM_ROWS):  # rows on disk are read in pieces
            part = slice(lo, lo + _SUM_ROWS)
            info = np.asarray(rows.weight[part], np.float64) * self.likelihood.information(
                rows.columns["counts"][part]
            )
            for name, total in cell_info.items():
                total += np.bincount(rows.columns["cells"][name][part], info, len(total))
        start = jax.tree.map(lambda s: np.full(s.shape, np.nan), self.latent_shapes())
        effects = {}
        for name, info in cell_info.items():
            diagonal = self.effect_levels[name].diagonal(info)  # the levels: prior only
            effects[name] = 1.0 / np.sqrt(self.effects[name].scale ** 2 * diagonal + 1.0)
        dispersion = self.likelihood.starting_scale(len(rows.unit))
        return eqx.tree_at(
            lambda z: (z.effects, z.dispersion),
            start,
            (effects, None if dispersion is None else np.float64(dispersion)),
            is_leaf=lambda x: x is None,
        )

    def init_latents(self, rows: UnitRows) -> CountLatents:
        """A start from host rows: intercepts at each unit's log mean count.

        Less the unit's mean offset; the rest at their priors' centres. Uncentred
        (``centre_covariates=False``), less the starting slopes times the unit's typical
        covariates' distance from :meth:`centre`: the start's log rate at those is the
        same either way.
        """
        n, total, offset = (np.zeros(self.n_units) for _ in range(3))
        for lo in range(0, len(rows.unit), _SUM_ROWS):  # rows on disk are read in pieces
            part = slice(lo, lo + _SUM_ROWS)
            unit = np.asarray(rows.unit[part])
            weight = np.asarray(rows.weight[part], np.float64)
            n += np.bincount(unit, weight, self.n_units)
            total += np.bincount(unit, weight * rows.columns["counts"][part], self.n_units)
            if "offset" in rows.columns:
                offset += np.bincount(unit, weight * rows.columns["offset"][part], self.n_units)
        level = np.log((total + 0.5) / (n + 0.5)) - offset / np.maximum(n, 1)
        start = super().init_latents(rows)
        if not self.centre_covariates:
            for name, b in self.unit_slopes(start).items():
                shift = np.asarray(self.table.centre[name]) - np.asarray(self.centre(name))
                level -= np.asarray(b, np.float64) * shift
        intercept = (level - self.intercept.loc) / self.intercept.scale
        return eqx.tree_at(lambda z: z.intercept, start, jnp.asarray(intercept, float_dtype()))


__all__ = ["CountLatents", "CountRegression", "EffectLevels", "UnitTable"]
