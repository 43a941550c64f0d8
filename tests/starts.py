"""Fits that take no step: for tests of what reads a fit (saved fits, checks, reports).

Such a test needs a fit's shape, not its answer; a real fit of a few steps would compile a
whole loop (several seconds) to produce the same kind of object.
"""

import jax
import numpy as np

import hbjax


def unfitted(data: hbjax.counts.CountData, kind: str = "unitblock") -> hbjax.FitResult:
    """A :class:`hbjax.FitResult` of ``data.model`` with a ``kind`` guide at its start
    (:meth:`~hbjax.counts.CountRegression.init_latents`), as a fit of 0 steps returns it."""
    model = data.model
    guide = hbjax.make_guide(kind, model, loc=model.init_latents(data.rows), key=jax.random.key(0))
    return hbjax.FitResult(
        model=model,
        guide=guide,
        losses=np.zeros(0, np.float32),
        opt_state=None,
        steps=0,
        wall_seconds=0.0,
        compile_seconds=0.0,
        iterations_per_second=0.0,
        num_traces=0,
        chunk_seconds=np.zeros(0),
    )
