"""A covariate's slope, fixed or hierarchical over a nesting of the units' labels.

A :class:`HierarchicalSlope` has a global value ``b ~ N(loc, scale)``, optionally values
at coarse-to-fine group levels, each around its parent (``b_l ~ N(b_parent, s_l)``), and
optionally one value per unit around its finest group (``b_i ~ N(b_group(i), s_unit)``).
With no levels and no unit values it is a fixed slope. Its latents are a dict:
``"global"`` ``[]``, one ``[n_level]`` entry per group level, and ``"unit"`` ``[unit]``
when it varies by unit.

With ``learned`` spreads each level's sd is a latent too, ``s_l = scale_l exp(eta_l)``
with a half-normal prior of sd ``scale_l`` (``eta_l = 0``: the fixed-scale model); its
latents are the model's, a dict ``{level: [], ..., "unit": []}`` passed beside ``z``.
The values keep their axes (``scale_l``), so they stay affine in the latents (centred
only: a non-centred value ``parent + s_l z`` would not be).

A slope holds the maps between its group levels, not the units' map: the caller passes
each unit's finest-level index, so the same layer serves all units or a batch of them.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Scalar

from .._types import float_dtype
from ..vi.layers import HALF_LOG_2PI, AbstractHierarchy, Centred, Normal

#: The latent key of a slope's per-unit values.
UNIT = "unit"
#: The latent key of a slope's global value.
GLOBAL = "global"
_LOG_2 = math.log(2.0)


class HierarchicalSlope(eqx.Module):
    """One covariate's slope: global, per group level (finest first) and per unit.

    Attributes:
        top: the global value's prior layer, ``N(loc, scale)``.
        levels: names of the group levels it varies over, finest first.
        sizes: the number of values at each level.
        parents: ``parents[j]`` ``[sizes[j]]``: index of level ``j``'s parent at level
            ``j + 1`` (the coarsest level's parent is the global value).
        scales: prior sd of each level's values around their parents (``levels`` order).
        unit_scale: prior sd of each unit's value around its finest group; ``None``: the
            slope does not vary by unit.
        hierarchy: :class:`~hbjax.vi.layers.Centred` or :class:`~hbjax.vi.layers.NonCentred`.
        learned: whether each level's sd is learned (see the module docstring).
    """

    top: Normal
    levels: tuple[str, ...] = eqx.field(static=True)
    sizes: tuple[int, ...] = eqx.field(static=True)
    parents: tuple[Int[Array, " _"], ...]
    scales: tuple[float, ...] = eqx.field(static=True)
    unit_scale: float | None = eqx.field(static=True)
    hierarchy: AbstractHierarchy
    learned: bool = eqx.field(static=True)

    def __init__(
        self,
        prior: tuple[float, float],
        *,
        levels: tuple[str, ...] = (),
        parents: tuple[Int[np.ndarray | Array, " _"], ...] = (),
        sizes: tuple[int, ...] = (),
        scales: tuple[float, ...] = (),
        unit_scale: float | None = None,
        hierarchy: AbstractHierarchy | None = None,
        learned: bool = False,
    ):
        """See the class attributes; ``parents`` has one entry per level but the coarsest."""
        loc, scale = (float(v) for v in prior)
        self.top = Normal(loc, scale, ())
        self.levels, self.sizes = tuple(levels), tuple(int(n) for n in sizes)
        expected = (len(self.levels),) * 3 + (max(len(self.levels) - 1, 0),)
        if (len(self.sizes), len(scales), len(self.levels), len(parents)) != expected:
            raise ValueError(
                "a hierarchical slope needs one size and one scale per level and one parent "
                f"map per level but the coarsest; got levels {levels}, sizes {sizes}, scales "
                f"{scales} and {len(parents)} parent map(s)."
            )
        if UNIT in self.levels or GLOBAL in self.levels:
            raise ValueError(f"{UNIT!r} and {GLOBAL!r} cannot name a group level.")
        self.parents = tuple(jnp.asarray(p, jnp.int32) for p in parents)
        self.scales = tuple(float(s) for s in scales)
        self.unit_scale = None if unit_scale is None else float(unit_scale)
        self.hierarchy = Centred() if hierarchy is None else hierarchy
        self.learned = bool(learned)
        if self.learned and not isinstance(self.hierarchy, Centred):
            raise ValueError(
                "learned spreads need the centred hierarchy (a non-centred value, parent + "
                "sd x latent, is not affine in the latents once the sd is one)."
            )

    @property
    def per_unit(self) -> bool:
        """Whether each unit has its own value."""
        return self.unit_scale is not None

    def latent_shapes(self, n_units: int) -> dict[str, jax.ShapeDtypeStruct]:
        """``{"global": [], level: [size], ..., "unit": [n_units]}``."""
        shapes = {GLOBAL: self.top.latent_shape()}
        for name, size in zip(self.levels, self.sizes, strict=True):
            shapes[name] = jax.ShapeDtypeStruct((size,), float_dtype())
        if self.per_unit:
            shapes[UNIT] = jax.ShapeDtypeStruct((n_units,), float_dtype())
        return shapes

    def spread_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
        """``{level: [], ..., "unit": []}``: the learned spreads' latents (none if fixed)."""
        if not self.learned:
            return {}
        levels = (*self.levels, UNIT) if self.per_unit else self.levels
        return {k: jax.ShapeDtypeStruct((), float_dtype()) for k in levels}

    def log_spreads(self, eta: dict[str, Array]) -> dict[str, Float[Array, "*p"]]:
        """Each level's log sd, ``log(scale) + eta`` (per sd of the column)."""
        fixed = dict(zip(self.levels, self.scales, strict=True)) | {UNIT: self.unit_scale}
        return {k: math.log(fixed[k]) + v for k, v in eta.items()}

    def spread_log_prior(self, eta: dict[str, Array]) -> Scalar:
        """Half-normal priors of the learned sds, as densities of ``eta = log(sd / scale)``."""
        total = jnp.zeros((), float_dtype())
        for v in eta.values():
            total = total + _LOG_2 - HALF_LOG_2PI - 0.5 * jnp.exp(2 * v) + v
        return total

    def _level_log_prior(
        self, latent: Array, parent: Array, scale: float, eta: Array | None
    ) -> Float[Array, "..."]:
        """Each value's log prior ``N(parent, scale exp(eta))`` as a density of its latent."""
        u = self.hierarchy.standardised(latent, parent, self.top.loc, scale)
        if eta is None:
            return -0.5 * u * u - HALF_LOG_2PI
        u = u * jnp.exp(-eta)
        return -0.5 * u * u - HALF_LOG_2PI - eta

    def group_values(self, z: dict[str, Array]) -> dict[str, Float[Array, "..."]]:
        """Natural values of the global value and every group level (no units)."""
        values = {GLOBAL: self.top(z[GLOBAL])}
        parent = values[GLOBAL][..., None]
        for j in reversed(range(len(self.levels))):  # coarse to fine
            centre = parent if j == len(self.levels) - 1 else jnp.take(parent, self.parents[j], -1)
            name = self.levels[j]
            values[name] = self.hierarchy.value(z[name], centre, self.top.loc, self.scales[j])
            parent = values[name]
        return values

    def _unit_parent(
        self, values: dict[str, Array], unit_level: Int[Array, " unit"] | None, n_units: int
    ) -> Float[Array, "*p unit"]:
        if not self.levels:
            g = values[GLOBAL]
            return jnp.broadcast_to(g[..., None], (*jnp.shape(g), n_units))
        return jnp.take(values[self.levels[0]], unit_level, axis=-1)

    def unit_values(
        self,
        z: dict[str, Array],
        values: dict[str, Array],
        unit_level: Int[Array, " unit"] | None,
        n_units: int,
    ) -> Float[Array, "*p unit"]:
        """Each unit's slope; ``unit_level``: each unit's index at the finest level."""
        parent = self._unit_parent(values, unit_level, n_units)
        if not self.per_unit:
            return parent
        return self.hierarchy.value(z[UNIT], parent, self.top.loc, self.unit_scale)

    def shared_log_prior(
        self, z: dict[str, Array], values: dict[str, Array], eta: dict[str, Array] | None = None
    ) -> Scalar:
        """Log prior of the global value, the group levels and the learned sds (``eta``)."""
        eta = eta or {}
        total = self.top.log_prior(z[GLOBAL]) + self.spread_log_prior(eta)
        for j, name in enumerate(self.levels):
            parent = (
                values[GLOBAL]
                if j == len(self.levels) - 1
                else jnp.take(values[self.levels[j + 1]], self.parents[j])
            )
            terms = self._level_log_prior(z[name], parent, self.scales[j], eta.get(name))
            total = total + jnp.sum(terms)
        return total

    def unit_log_prior(
        self,
        z: dict[str, Array],
        values: dict[str, Array],
        unit_level: Int[Array, " unit"] | None,
        n_units: int,
        eta: dict[str, Array] | None = None,
    ) -> Float[Array, " unit"] | float:
        """``[unit]`` each unit's value's log prior; 0 when it has none."""
        if not self.per_unit:
            return 0.0
        parent = self._unit_parent(values, unit_level, n_units)
        return self._level_log_prior(z[UNIT], parent, self.unit_scale, (eta or {}).get(UNIT))


__all__ = ["GLOBAL", "UNIT", "HierarchicalSlope"]
