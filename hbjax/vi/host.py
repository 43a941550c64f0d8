"""What a fit reads: a data source, over data that knows where it lives.

:func:`hbjax.fit` takes a data source:

* :class:`FullBatch`: every step sees all the data: host rows split over a mesh, data
  already placed, or any pytree of arrays (one device).
* :class:`Minibatches`: each step sees a batch of whole units drawn from host rows (or
  from a sampler of your own).

It knows data through these interfaces only, so the fitting core imports neither pandas,
the layouts (:mod:`hbjax.parallel`) nor the count application:

* :class:`AbstractPlacedData`: data that carries the mesh it is placed on (``None``: on the
  host); a fit keeps placed data where it is.
* :class:`AbstractHostData`: host data that can place itself on a mesh
  (:meth:`~AbstractHostData.place`) and draw minibatches of whole units
  (:meth:`~AbstractHostData.sampler`): :class:`hbjax.UnitRows`.
* :class:`AbstractSampler`: draws a chunk of steps' batches, placed on its mesh:
  :class:`hbjax.parallel.rows.RowSampler`.
"""

import abc
import dataclasses

import equinox as eqx
import jax
import numpy as np
from equinox import AbstractVar
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


class AbstractPlacedData(eqx.Module):
    """Data that knows the mesh it is placed on (``mesh``: ``None`` while on the host)."""

    mesh: AbstractVar[Mesh | None]


class AbstractHostData(AbstractPlacedData):
    """Host data that places itself on a mesh or is sampled in minibatches of units."""

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


def _on_host(data: object) -> bool:
    return isinstance(data, AbstractHostData) and data.mesh is None


@dataclasses.dataclass(frozen=True)
class FullBatch:
    """Every step sees all the data.

    Args:
        data: host :class:`~hbjax.UnitRows` (e.g. ``hbjax.counts.from_frame(...).rows``),
            data already placed (e.g. :meth:`hbjax.counts.CountData.grid`: it keeps its
            mesh and layout), or any pytree of arrays (sent to the default device).
        mesh: split host rows over this mesh (:func:`hbjax.make_mesh`) in blocks of whole
            units; default one device. The result does not depend on the number of devices.
    """

    data: PyTree
    mesh: Mesh | None = None

    def __post_init__(self):
        leaves = jax.tree.leaves(self.data)
        if not leaves or not all(isinstance(x, jax.Array | np.ndarray) for x in leaves):
            raise TypeError(
                "the data must be hbjax.UnitRows (e.g. hbjax.counts.from_frame(...).rows), "
                "placed data, or a pytree of arrays for a model of your own; got "
                f"{type(self.data).__name__}."
            )
        if self.mesh is not None and not _on_host(self.data):
            raise TypeError(
                "FullBatch(..., mesh=...) splits host hbjax.UnitRows over the devices; got "
                f"{type(self.data).__name__}. Put your data in hbjax.UnitRows (rows of whole "
                "units) and write the model as an hbjax.AbstractRowModel."
            )

    def place(self) -> tuple[PyTree, Mesh | None]:
        """The data on the devices, and the mesh it is on (``None``: the default device)."""
        if _on_host(self.data):
            return self.data.place(self.mesh)
        if isinstance(self.data, AbstractPlacedData):
            return self.data, self.data.mesh
        return jax.device_put(self.data), None


@dataclasses.dataclass(frozen=True)
class Minibatches:
    """Each step sees ``batch_size`` whole units drawn from host rows (minibatch SVI).

    Each step draws units in every block of the sharding plan (``batch_size`` rounded up
    to a multiple of the block count, itself a multiple of the device count; the fit
    reports it), weights them so that log weights are unbiased, and updates the drawn units'
    guide parameters and every shared one; the optimiser state of units not drawn is left
    as it was (lazy Adam). The rows stay on the host (memory-mapped ones too: a folder from
    ``hbjax prepare``); chunks of batches go to the devices, each prepared while the
    previous one runs. The default optimiser's decay is per epoch.

    Args:
        data: host :class:`~hbjax.UnitRows`, or a sampler of your own (an
            :class:`AbstractSampler`, with ``batch_size`` and ``mesh`` left out).
        batch_size: units per step.
        mesh: the devices each batch is split over (default one device).
    """

    data: AbstractHostData | AbstractSampler
    batch_size: int | None = None
    mesh: Mesh | None = None

    def __post_init__(self):
        if isinstance(self.data, AbstractSampler):
            if self.batch_size is not None or self.mesh is not None:
                raise ValueError(
                    "a sampler brings its own batch size and mesh; leave batch_size and mesh "
                    "out of Minibatches(sampler)."
                )
            return
        if not _on_host(self.data):
            raise TypeError(
                "Minibatches takes host hbjax.UnitRows (e.g. hbjax.counts.from_frame(...).rows) "
                f"or an AbstractSampler, not {type(self.data).__name__}: the full data stays "
                "on the host."
            )
        if self.batch_size is None:  # its value is checked against the rows' units
            raise ValueError("Minibatches(rows, batch_size=...) needs batch_size (units per step).")

    def sampler(self, model: object, seed: int) -> AbstractSampler:
        """The sampler of these batches (host rows checked against ``model``)."""
        if isinstance(self.data, AbstractSampler):
            return self.data
        self.data.check_model(model)
        return self.data.sampler(self.batch_size, self.mesh, seed)


__all__ = [
    "AbstractHostData",
    "AbstractPlacedData",
    "AbstractSampler",
    "FullBatch",
    "Minibatches",
]
