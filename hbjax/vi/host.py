"""Data on the host, until a fit places it on devices or samples batches of it.

:func:`hbjax.fit` knows data through these two interfaces only, so the fitting core
imports neither pandas, the layouts (:mod:`hbjax.parallel`) nor the count application:

* :class:`AbstractHostData`: host data that can place itself on a mesh
  (:meth:`~AbstractHostData.place`) and draw minibatches of whole units
  (:meth:`~AbstractHostData.sampler`): :class:`hbjax.UnitRows`.
* :class:`AbstractSampler`: draws a chunk of steps' batches, placed on its mesh:
  :class:`hbjax.RowSampler`.

Any other pytree of arrays is fitted as it is (sent to the default device).
"""

from __future__ import annotations

import abc

import equinox as eqx
import numpy as np
from jax.sharding import Mesh
from jaxtyping import PyTree


class AbstractSampler(abc.ABC):
    """Draws batches of whole units from host data, a chunk of steps at a time.

    Attributes:
        batch_size: units per step.
        mesh: the mesh the batches are placed on.
        steps_per_epoch: ``n_units / batch_size`` (fractional).
        bytes_per_step: bytes of one step's batch (the fit sizes its chunks by it).
    """

    batch_size: int
    mesh: Mesh
    steps_per_epoch: float
    bytes_per_step: int

    @abc.abstractmethod
    def batches(self, first_step: int, count: int) -> PyTree:
        """Steps ``first_step .. first_step + count - 1``: batches with a leading step axis."""


class AbstractHostData(eqx.Module):
    """Host data that places itself on a mesh or is sampled in minibatches of units.

    A subclass has a field ``mesh``: ``None`` on the host, the mesh once placed (a field
    of the subclass, last, with its default; not declared here, where it would come
    first among the dataclass fields).
    """

    @abc.abstractmethod
    def place(self, mesh: Mesh | None) -> tuple[PyTree, Mesh | None]:
        """The data split over ``mesh``.

        Returns the placed data and its mesh (``None``: on the default device, unsplit).
        """

    def check_model(self, model: object) -> None:
        """Raise ``TypeError`` if ``model`` cannot read this data (default: any can)."""
        del model

    @abc.abstractmethod
    def sampler(self, batch_size: int, mesh: Mesh | None, seed: int) -> AbstractSampler:
        """A sampler of ``batch_size`` units per step on ``mesh``, drawing with ``seed``."""

    @abc.abstractmethod
    def unit_batch(self, units: np.ndarray) -> PyTree:
        """A batch of the given units with all their rows, weight 1, unplaced.

        For checks on a subsample of units (:mod:`hbjax.vi.checks`): the model's
        ``slot_log_joint`` of it gives each unit's own terms.
        """


__all__ = ["AbstractHostData", "AbstractSampler"]
