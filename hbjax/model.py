"""The article's elasticity model (:class:`ElasticityModel`) and its latents.

The interface every model implements, and the capability of minibatched models, live in
:mod:`hbjax.vi.model` (:class:`~hbjax.AbstractModel`, :class:`~hbjax.AbstractUnitModel`).
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, Scalar

from ._types import LatentLeaf, UnitInt
from .families import AbstractCountLikelihood, Poisson, checked_clip, make_likelihood
from .layers import AbstractHierarchy, Nested, Normal, as_hierarchy
from .likelihood import dense_log_likelihood, panel_log_likelihood
from .minibatch import (
    UnitBatch,
    UnitStats,
    batch_log_likelihood,
    slot_log_likelihood,
    slot_log_rate,
)
from .panel import DensePanel, Panel
from .parallel.layouts import AbstractLayout, Auto, Rows
from .vi.model import AbstractUnitModel

_LOG_2PI = math.log(2 * math.pi)  # two standard normals per slot: 2 x log(2 pi) / 2


class ElasticityLatents(eqx.Module):
    """Latents of :class:`ElasticityModel` (non-centred ``z``, or natural values).

    A leading particle/sample axis may precede every shape below.

    Attributes:
        global_elasticity: ``[]``, the global elasticity.
        group_elasticity: ``[group]``, category elasticities.
        unit_elasticity: ``[unit]``, product elasticities.
        unit_effect: ``[unit]``, product intercepts.
        group_period_effect: ``[group * period]``, (category, period) effects, flattened
            as ``group * n_periods + period``.
        dispersion: ``[]``, the count likelihood's parameter (the negative binomial's
            dispersion ``phi``); ``None`` for the Poisson.
    """

    global_elasticity: Float[LatentLeaf, "*p"]
    group_elasticity: Float[LatentLeaf, "*p group"]
    unit_elasticity: Float[LatentLeaf, "*p unit"]
    unit_effect: Float[LatentLeaf, "*p unit"]
    group_period_effect: Float[LatentLeaf, "*p cell"]
    dispersion: Float[LatentLeaf, "*p"] | None = None


class ElasticityModel(AbstractUnitModel):
    """The article's model of log demand.

    ``log E[units_it] = beta_i log(price_it) + gamma_{c(i),t} + delta_i``, Poisson counts, with
    ``beta_g ~ N(-2, 1)``, ``beta_c ~ N(beta_g, 1)``, ``beta_i ~ N(beta_c(i), 2)``,
    ``delta_i ~ N(0, 3)``, ``gamma_ct ~ N(0, 3)``.

    **Likelihood** (``likelihood``): Poisson counts (the article's), or negative binomial
    counts with the same mean and one global dispersion ``phi`` (variance
    ``mu + phi mu^2``; :class:`hbjax.NegativeBinomial`) for overdispersed sales, where a
    Poisson fit reports intervals far too narrow. The negative binomial needs the rows
    layout (:meth:`panel_layout`): its log-likelihood has no sufficient statistics.

    **Hierarchy** (``hierarchy``): ``"noncentred"`` (the article's LocScaleReparam) has
    latents ``z`` with ``beta_c = beta_g + 1 z_c`` and ``beta_i = beta_c + 2 z_i``;
    ``"centred"`` (the default of :meth:`from_panel`) has latents on the elasticities'
    own scale, ``beta_c = -2 + 1 v_c`` and ``beta_i = -2 + 2 u_i``, with the same priors
    (``z = v - (beta_parent + 2) / scale``: a shift, unit Jacobian). With a year of weekly
    data per product the posterior pins each ``beta_i`` and leaves its category loose; in
    the non-centred coordinates a category's ``z_c`` and its products' ``z_i`` are then
    strongly correlated, and any guide that misses it reports category intervals ~9x too
    narrow (benchmarks/README.md, "Intervals against NUTS"). Centred, they are nearly
    independent (Betancourt & Girolami 2015; the scales here are fixed: there is no funnel).

    **Price centring** (``price_centre``, on by default in :meth:`from_panel`): the guide
    sees each unit's intercept at its own mean log price, ``delta_i + beta_i m_i``, instead
    of at log price 0. With raw log prices the posterior correlation of a unit's elasticity
    and intercept is about -0.99, which a mean-field guide cannot represent (intervals
    ~10x too narrow) and which SVI walks slowly; centred, the two are nearly uncorrelated.
    This is a reparameterisation with unit Jacobian: the model, its prior on ``delta_i``
    and :meth:`natural` values are unchanged.

    **Where the intercept's prior sits** (``intercept_prior_price``): the article puts
    ``N(0, 3)`` on ``delta_i``, the log demand at log price 0, i.e. at a price of 1 in
    whatever currency unit the data use; in cents instead of dollars that prior moves by
    ``beta_i log 100`` (about 9) and pulls every product's elasticity with it. With
    ``intercept_prior_price = r`` the prior is on the log demand at each unit's own
    reference log price, ``delta_i + beta_i r_i ~ N(0, 3)``: with ``r`` the demand-weighted
    mean log price (:meth:`from_panel`'s default) the answers do not depend on the
    currency unit. ``None`` gives the article's prior.

    Attributes:
        global_elasticity: the global layer.
        group_elasticity: categories around the global elasticity.
        unit_elasticity: products around their category.
        unit_effect: product intercepts.
        group_period_effect: (category, period) effects.
        clip_log_rate: ``(lo, hi)`` to clip the log-rate as the article did
            (``(-4.0, 20.0)``), or ``None`` for the exact Poisson model.
        price_centre: ``[unit]`` log price ``m_i`` at which the latent intercept
            ``unit_effect`` is taken (``delta_i + beta_i m_i``), or ``None`` (at 0).
        intercept_prior_price: ``[unit]`` log price ``r_i`` at which the intercept's
            prior sits (``delta_i + beta_i r_i ~ N(0, effect_scale)``), or ``None`` (at 0,
            the article's).
        hierarchy: the elasticities' parameterisation, :class:`hbjax.layers.Centred` or
            :class:`hbjax.layers.NonCentred` (an :class:`~hbjax.layers.AbstractHierarchy`).
        likelihood: the count likelihood (:class:`hbjax.Poisson` or
            :class:`hbjax.NegativeBinomial`).
    """

    global_elasticity: Normal
    group_elasticity: Nested
    unit_elasticity: Nested
    unit_effect: Normal
    group_period_effect: Normal
    clip_log_rate: tuple[float, float] | None = eqx.field(static=True)
    price_centre: Float[Array, " unit"] | None
    intercept_prior_price: Float[Array, " unit"] | None
    hierarchy: AbstractHierarchy = eqx.field(static=True)
    likelihood: AbstractCountLikelihood

    def __init__(
        self,
        unit_group: UnitInt,
        n_groups: int,
        n_periods: int,
        *,
        clip_log_rate: tuple[float, float] | None = None,
        global_prior: tuple[float, float] = (-2.0, 1.0),
        group_scale: float = 1.0,
        unit_scale: float = 2.0,
        effect_scale: float = 3.0,
        group_period_scale: float = 3.0,
        price_centre: Float[ArrayLike, " _unit"] | None = None,
        intercept_prior_price: Float[ArrayLike, " _unit"] | None = None,
        hierarchy: str | AbstractHierarchy = "noncentred",
        likelihood: str | AbstractCountLikelihood = "poisson",
    ):
        """Build the model from the unit → group map and the sizes.

        Args:
            unit_group: ``[unit]`` group index of each unit.
            n_groups: number of groups.
            n_periods: number of periods.
            clip_log_rate: see the class attributes.
            global_prior: ``(mean, sd)`` of the global elasticity.
            group_scale: prior sd of categories around the global elasticity.
            unit_scale: prior sd of products around their category.
            effect_scale: prior sd of product intercepts.
            group_period_scale: prior sd of (category, period) effects.
            price_centre: see the class attributes (:meth:`from_panel` computes it).
            intercept_prior_price: see the class attributes (:meth:`from_panel` computes
                it); ``None`` here: the article's prior at log price 0.
            hierarchy: ``"noncentred"`` (default here, the article's) or ``"centred"``
                (the default of :meth:`from_panel`), or the module itself; see the class
                docstring.
            likelihood: ``"poisson"`` (default), ``"negbin"``, or a likelihood module
                (:mod:`hbjax.families`).
        """
        self.hierarchy = as_hierarchy(hierarchy)
        self.likelihood = make_likelihood(likelihood)
        unit_group = jnp.asarray(unit_group, dtype=jnp.int32)
        self.global_elasticity = Normal(global_prior[0], global_prior[1], ())
        self.group_elasticity = Nested(group_scale, shape=(n_groups,))
        self.unit_elasticity = Nested(unit_scale, index=unit_group)
        self.unit_effect = Normal(0.0, effect_scale, (int(unit_group.shape[0]),))
        self.group_period_effect = Normal(0.0, group_period_scale, (n_groups * n_periods,))
        self.clip_log_rate = checked_clip(clip_log_rate)
        self.price_centre = _per_unit("price_centre", price_centre, unit_group.shape)
        self.intercept_prior_price = _per_unit(
            "intercept_prior_price", intercept_prior_price, unit_group.shape
        )

    @classmethod
    def from_panel(
        cls,
        panel: Panel | DensePanel | UnitStats,
        *,
        centre_prices: bool = True,
        hierarchy: str | AbstractHierarchy = "centred",
        intercept_prior: str = "reference",
        **options: object,
    ) -> ElasticityModel:
        """The model for a panel's units, groups and periods (options as in ``__init__``).

        Args:
            panel: a host or sharded panel. In a multi-process run pass the *placed* panel
                (:func:`hbjax.shard_panel`): each process's host panel holds only its own
                units' rows, and the price centres must come from all of them (or, for a
                minibatch fit that leaves the rows on the host,
                :meth:`hbjax.minibatch.UnitStats.gather`).
            centre_prices: centre each unit's intercept at its demand-weighted mean log price
                (see the class docstring); ``False`` gives the article's raw parameterisation.
            hierarchy: ``"centred"`` (default) or ``"noncentred"`` (the article's); see the
                class docstring.
            intercept_prior: ``"reference"`` (default): each intercept's prior at the
                unit's demand-weighted mean log price (answers free of the currency unit);
                ``"zero"``: at log price 0, the article's.
            options: keyword arguments of ``__init__``.
        """
        if intercept_prior not in INTERCEPT_PRIORS:
            raise ValueError(
                f"intercept_prior must be one of {', '.join(INTERCEPT_PRIORS)}; got "
                f"{intercept_prior!r}."
            )
        centres = None
        if centre_prices and "price_centre" not in options:
            options["price_centre"] = centres = unit_price_centres(panel)
        if intercept_prior == "reference" and "intercept_prior_price" not in options:
            reference = unit_price_centres(panel) if centres is None else centres
            options["intercept_prior_price"] = reference
        return cls(
            panel.unit_group,  # type: ignore[arg-type]
            panel.n_groups,
            panel.n_periods,
            hierarchy=hierarchy,
            **options,  # type: ignore[arg-type]
        )

    def latent_shapes(self) -> ElasticityLatents:
        """Shapes of the latents (the same for both hierarchies)."""
        return ElasticityLatents(
            self.global_elasticity.latent_shape(),  # type: ignore[arg-type]
            self.group_elasticity.latent_shape(),  # type: ignore[arg-type]
            self.unit_elasticity.latent_shape(),  # type: ignore[arg-type]
            self.unit_effect.latent_shape(),  # type: ignore[arg-type]
            self.group_period_effect.latent_shape(),  # type: ignore[arg-type]
            self.likelihood.latent_shape(),  # type: ignore[arg-type]
        )

    def log_prior(self, latents: ElasticityLatents) -> Scalar:
        """Sum of the layers' standard-normal log priors on ``z``.

        With price centring the intercept's prior is taken at the uncentred ``z`` of
        ``delta_i``, and with a centred hierarchy the elasticities' priors at their
        non-centred ``z`` (both maps are shifts: unit Jacobian).
        """
        z_group, z_unit = self._noncentred_z(self.elasticities(latents), latents)
        return (
            self.global_elasticity.log_prior(latents.global_elasticity)
            + self.group_elasticity.log_prior(z_group)
            + self.unit_elasticity.log_prior(z_unit)
            + self.unit_effect.log_prior(self._prior_effect_z(latents))
            + self.group_period_effect.log_prior(latents.group_period_effect)
            + self.likelihood.log_prior(latents.dispersion)
        )

    def elasticities(
        self, latents: ElasticityLatents, unit_group: Int[Array, " slot"] | None = None
    ) -> tuple[Float[ArrayLike, "*p"], Float[ArrayLike, "*p group"], Float[ArrayLike, "*p unit"]]:
        """Global, group and unit elasticities (natural scale) of one set of latents.

        ``unit_group``: the group of each slot when the unit leaves hold some units only
        (a batch, or a chunk of units to summarise); default: every unit.
        """
        index = self.unit_elasticity.index if unit_group is None else unit_group
        beta_g = self.global_elasticity(latents.global_elasticity)
        top, how = self.global_elasticity.loc, self.hierarchy
        scale_c, scale_i = self.group_elasticity.scale, self.unit_elasticity.scale
        beta_c = how.value(latents.group_elasticity, jnp.expand_dims(beta_g, -1), top, scale_c)
        parent = jnp.take(beta_c, index, axis=-1)
        return beta_g, beta_c, how.value(latents.unit_elasticity, parent, top, scale_i)

    def _noncentred_z(
        self,
        elasticities: tuple[ArrayLike, ArrayLike, ArrayLike],
        latents: ElasticityLatents,
        unit_group: Int[Array, " slot"] | None = None,
    ) -> tuple[Float[ArrayLike, "*p group"], Float[ArrayLike, "*p unit"]]:
        """The standard-normal ``z`` of the group and unit elasticities (their priors)."""
        beta_g, beta_c, _ = elasticities
        index = self.unit_elasticity.index if unit_group is None else unit_group
        top, how = self.global_elasticity.loc, self.hierarchy
        z_group = how.standardised(
            latents.group_elasticity,
            jnp.expand_dims(beta_g, -1),
            top,
            self.group_elasticity.scale,
        )
        parent = jnp.take(beta_c, index, axis=-1)
        z_unit = how.standardised(latents.unit_elasticity, parent, top, self.unit_elasticity.scale)
        return z_group, z_unit

    def _unit_elasticity(self, latents: ElasticityLatents) -> Float[ArrayLike, "*p unit"]:
        return self.elasticities(latents)[2]

    def _prior_offset(
        self, unit: Int[Array, " slot"] | None = None
    ) -> Float[Array, " slot"] | None:
        """``r - m`` per unit (or slot): from the latent intercept's price to its prior's."""
        if self.price_centre is None and self.intercept_prior_price is None:
            return None
        m, r = self.price_centre, self.intercept_prior_price
        offset = (0.0 if r is None else r) - (0.0 if m is None else m)
        return offset if unit is None else jnp.take(offset, unit)

    def _prior_effect_z(self, latents: ElasticityLatents) -> Float[ArrayLike, "*p unit"]:
        """The ``z`` of the intercept where its prior sits, ``(delta_i + beta_i r_i) / 3``."""
        offset = self._prior_offset()
        if offset is None:
            return latents.unit_effect
        shift = self._unit_elasticity(latents) * offset
        return latents.unit_effect + shift / self.unit_effect.scale

    def natural(self, latents: ElasticityLatents) -> ElasticityLatents:
        """Natural-scale values (elasticities, effects) of one set of latents."""
        beta_g, beta_c, beta_i = self.elasticities(latents)
        delta_i = self.unit_effect(latents.unit_effect)
        if self.price_centre is not None:
            delta_i = delta_i - beta_i * self.price_centre
        return ElasticityLatents(
            global_elasticity=beta_g,
            group_elasticity=beta_c,
            unit_elasticity=beta_i,
            unit_effect=delta_i,
            group_period_effect=self.group_period_effect(latents.group_period_effect),
            dispersion=self.likelihood.natural(latents.dispersion),
        )

    def _leaf_flags(self, flags: tuple[bool, ...], *, dispersion: bool) -> ElasticityLatents:
        """One flag per latent leaf, in field order (the dispersion's only if it exists)."""
        extra = [] if self.likelihood.latent_shape() is None else [dispersion]
        return jax.tree.unflatten(jax.tree.structure(self.latent_shapes()), [*flags, *extra])

    def unit_leaves(self) -> ElasticityLatents:
        """Product elasticities and intercepts are per unit; the rest are shared."""
        return self._leaf_flags((False, False, True, True, False), dispersion=False)

    def reported_leaves(self) -> ElasticityLatents:
        """The elasticities and the dispersion (intercepts, period effects: nuisance)."""
        return self._leaf_flags((True, True, True, False, False), dispersion=True)

    def _likelihood_parameter(self, latents: ElasticityLatents) -> Array | None:
        return self.likelihood.parameter(latents.dispersion)

    def _slot_terms(self, latents: ElasticityLatents, batch: UnitBatch) -> tuple:
        """What the batch functions share: ``z`` of the groups, the slots' values and priors."""
        elasticities = self.elasticities(latents, batch.group)
        z_group, z_beta = self._noncentred_z(elasticities, latents, batch.group)
        beta = elasticities[2]
        z_delta = latents.unit_effect
        delta = self.unit_effect(z_delta)
        if self.price_centre is None:
            centre = jnp.zeros_like(beta)
        else:
            centre = jnp.take(self.price_centre, batch.unit)
        offset = self._prior_offset(batch.unit)
        if offset is not None:
            z_delta = z_delta + beta * offset / self.unit_effect.scale
        slot_prior = -0.5 * (z_beta**2 + z_delta**2) - _LOG_2PI
        gamma = self.group_period_effect(latents.group_period_effect)
        return z_group, (beta, delta, gamma, centre), slot_prior

    def batch_log_joint(self, latents: ElasticityLatents, batch: UnitBatch) -> Scalar:
        """Log joint estimated from a batch of units (see :meth:`AbstractModel.batch_log_joint`).

        ``latents.unit_elasticity`` and ``latents.unit_effect`` are ``[slot]``: the batch's
        units. Shared latents enter with weight 1, each slot's terms with its weight.
        """
        z_group, values, slot_prior = self._slot_terms(latents, batch)
        shared = (
            self.global_elasticity.log_prior(latents.global_elasticity)
            + self.group_elasticity.log_prior(z_group)
            + self.group_period_effect.log_prior(latents.group_period_effect)
            + self.likelihood.log_prior(latents.dispersion)
        )
        likelihood = batch_log_likelihood(
            *values,
            batch,
            self.clip_log_rate,
            self.likelihood,
            self._likelihood_parameter(latents),
        )
        return shared + jnp.sum(batch.weight * slot_prior) + likelihood

    def slot_log_joint(self, latents: ElasticityLatents, batch: UnitBatch) -> Float[Array, " slot"]:
        """Each slot's own terms (see :meth:`AbstractModel.slot_log_joint`); unplaced batch."""
        _, (beta, delta, gamma, centre), slot_prior = self._slot_terms(latents, batch)
        grid = (batch.log_price, batch.counts, batch.observed, batch.log_factorial)
        likelihood = slot_log_likelihood(
            beta,
            delta,
            gamma,
            centre,
            batch.group,
            *grid,
            self.clip_log_rate,
            self.likelihood,
            self._likelihood_parameter(latents),
        )
        return slot_prior + likelihood

    def slot_log_rate(
        self, latents: ElasticityLatents, batch: UnitBatch
    ) -> Float[Array, "slot period"]:
        """Each slot's log expected units on its ``[slot, period]`` grid (unplaced batch)."""
        _, (beta, delta, gamma, centre), _ = self._slot_terms(latents, batch)
        return slot_log_rate(
            beta, delta, gamma, centre, batch.group, batch.log_price, self.clip_log_rate
        )

    def panel_layout(self) -> AbstractLayout:
        """Rows when the log-rate is clipped or the counts are not Poisson (no dense stats)."""
        poisson = isinstance(self.likelihood, Poisson)
        return Rows() if self.clip_log_rate is not None or not poisson else Auto()

    def log_likelihood(self, latents: ElasticityLatents, panel: Panel | DensePanel) -> Scalar:
        """Log-likelihood of the panel's rows (Poisson or the model's ``likelihood``).

        With price centring the kernels get the centred intercept and the centres, and
        subtract the centre from each log price: ``beta * (x - m) + delta_c``, never the
        numerically poorer ``beta * x + (delta_c - beta * m)``.
        """
        beta = self._unit_elasticity(latents)
        args = (
            beta,
            self.unit_effect(latents.unit_effect),
            self.group_period_effect(latents.group_period_effect),
            panel,
            self.clip_log_rate,
            self.price_centre,
        )
        if isinstance(panel, DensePanel):
            if not isinstance(self.likelihood, Poisson):
                raise ValueError(
                    f"the dense layout holds Poisson sufficient statistics; a "
                    f"{self.likelihood.name} likelihood needs the rows layout "
                    "(shard_panel(..., layout=model.panel_layout()))."
                )
            return dense_log_likelihood(*args)
        return panel_log_likelihood(*args, self.likelihood, self._likelihood_parameter(latents))

    def init_latents(self, panel: Panel | DensePanel | UnitStats) -> ElasticityLatents:
        """A data-informed start, deterministic (no key).

        Each unit's elasticity starts at the slope of a regression of log demand on log
        price weighted by demand (the Poisson information), shrunk to the prior mean by the
        prior's precision; its intercept at the weighted means; each group at the mean of
        its units. The guide then starts near the posterior mode instead of walking the
        long elasticity/intercept ridge from the prior. (With price centring the latent
        intercept is the one at the unit's centre.)
        """
        sw, swx, swxx, swl, swxl = jnp.asarray(panel.unit_moments(), jnp.float32)
        sw = jnp.maximum(sw, 1e-6)
        mean_x, mean_l = swx / sw, swl / sw
        info = jnp.maximum(swxx - sw * mean_x**2, 0.0)
        cross = swxl - sw * mean_x * mean_l
        beta_0 = self.global_elasticity.loc
        prior_var = (
            self.global_elasticity.scale**2
            + self.group_elasticity.scale**2
            + self.unit_elasticity.scale**2
        )
        beta = (cross + beta_0 / prior_var) / (info + 1 / prior_var)
        delta = mean_l - beta * mean_x
        unit_group = jnp.asarray(self.unit_elasticity.index)
        n_groups = self.group_elasticity.shape[0]
        members = jax.ops.segment_sum(jnp.ones_like(beta), unit_group, n_groups)
        # Split each group's demand level between its units' intercepts and its (group,
        # period) effects as their equal-variance priors would (the MAP split of a constant
        # level): without it the guide spends thousands of steps walking that ridge.
        n_periods = self.group_period_effect.shape[0] // n_groups
        level = jax.ops.segment_sum(delta, unit_group, n_groups) / (members + n_periods)
        delta = delta - level[unit_group]
        if self.price_centre is not None:
            delta = delta + beta * self.price_centre
        group = jax.ops.segment_sum(beta, unit_group, n_groups) / jnp.maximum(members, 1.0)
        group = jnp.where(members > 0, group, beta_0)
        zeros = super().init_latents(panel)
        # the global latent starts at its prior mean beta_0, the groups' parent
        how = self.hierarchy
        scale_c, scale_i = self.group_elasticity.scale, self.unit_elasticity.scale
        return ElasticityLatents(
            global_elasticity=zeros.global_elasticity,
            group_elasticity=how.latent(group, beta_0, beta_0, scale_c),
            unit_elasticity=how.latent(beta, group[unit_group], beta_0, scale_i),
            unit_effect=(delta - self.unit_effect.loc) / self.unit_effect.scale,
            group_period_effect=(jnp.repeat(level, n_periods) - self.group_period_effect.loc)
            / self.group_period_effect.scale,
            dispersion=zeros.dispersion,  # the prior's median
        )


#: Where the intercept's prior sits (see :meth:`ElasticityModel.from_panel`).
INTERCEPT_PRIORS = ("reference", "zero")


def _per_unit(name: str, values: ArrayLike | None, shape: tuple[int, ...]) -> Array | None:
    """``values`` as float32 ``[unit]``, or ``None``; a clear error for the wrong shape."""
    if values is None:
        return None
    values = jnp.asarray(values, jnp.float32)
    if values.shape != shape:
        raise ValueError(
            f"{name} must have one value per unit, shape {shape}; got shape {values.shape}."
        )
    return values


def unit_price_centres(panel: Panel | DensePanel | UnitStats) -> Float[Array, " unit"]:
    """Each unit's mean log price weighted by ``counts + 1/2`` (its Poisson information).

    Centring the intercept there makes it nearly uncorrelated with the elasticity a
    posteriori. Works on host and sharded panels (the result is replicated).
    """
    if isinstance(panel, DensePanel):  # the centres its grid is stored at: no shift
        return jnp.asarray(panel.grid_centre, jnp.float32)
    moments = jnp.asarray(panel.unit_moments(), jnp.float32)
    weight, weighted_price = moments[0], moments[1]
    return jnp.where(weight > 0, weighted_price / jnp.maximum(weight, 1e-6), 0.0)
