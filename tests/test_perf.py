"""The compiled step: nothing in it grows with the data, and no GPU-hostile shapes."""

import jax
import numpy as np
import pytest

import hbjax
from hbjax.vi import perf


def report(n_units, layout, guide_name="unitblock", particle_map="auto"):
    sim = hbjax.simulate(n_units=n_units, n_periods=8, n_groups=3, seed=1)
    data = hbjax.counts.elasticity_data(sim.frame)
    model, mesh = data.model, hbjax.make_mesh(1)
    placed = data.grid(mesh) if layout == "dense" else hbjax.shard_rows(data.rows, mesh)
    guide = hbjax.make_guide(guide_name, model, loc=model.init_latents(data.rows))

    def objective(model, guide, panel, *, key):
        return hbjax.vi.objectives.renyi_elbo(
            model, guide, panel, key=key, particle_map=particle_map
        )

    text = perf.step_program(model, guide, placed, key=jax.random.key(0), objective=objective)
    return perf.program_report(text)


@pytest.mark.parametrize("layout", ["dense", "rows"])
@pytest.mark.parametrize("guide_name", ["meanfield", "unitblock"])
def test_the_step_program_does_not_grow_with_the_data(layout, guide_name):
    small, large = report(40, layout, guide_name), report(400, layout, guide_name)
    # data and parameters are arguments, never constants baked into the program
    assert small.largest_constant <= 16 and large.largest_constant <= 16
    assert (small.constants, small.loops, small.collectives, len(small.scatters)) == (
        large.constants,
        large.loops,
        large.collectives,
        len(large.scatters),
    )
    # no conditional: on a GPU each one is a host round trip
    assert small.conditionals == large.conditionals == 0


def test_vectorized_particles_need_no_particle_loop():
    sequential, vectorized = (
        report(40, "dense", particle_map="sequential"),
        report(40, "dense", particle_map="vectorized"),
    )
    # lax.map over particles is one loop forward and one backward; vmap has neither
    assert sequential.loops - vectorized.loops == 2


def test_report_reads_constants_scatters_and_loops_from_text():
    text = (
        jax.jit(
            lambda x, i: (
                jax.lax.fori_loop(0, 3, lambda _, y: y + np.arange(50.0, dtype=np.float32), x),
                jax.ops.segment_sum(x, i, 5),
            )
        )
        .lower(np.zeros(50, np.float32), np.zeros(50, np.int32))
        .as_text()
    )
    got = perf.program_report(text)
    assert got.largest_constant == 50  # the closed-over array
    assert got.scatters == ((50, 5),) and got.worst_scatter_contention == 10
    assert got.loops == 1 and got.conditionals == 0
