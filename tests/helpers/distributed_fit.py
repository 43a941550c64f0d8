"""One process of a fit that averages and stops early (a loose convergence rule).

``python tests/helpers/distributed_fit.py OUT.npz [--batch-size B] [--coordinator HOST:PORT
--process-id I]``: the article's model of a small simulated panel through
:func:`hbjax.fit`, on the grid (full batch) or minibatched; process 0 saves the fitted
guide's leaves, the steps and where averaging began.
"""

import argparse

import jax
import numpy as np

import hbjax
from hbjax.parallel.hosts import DistributedConfig, initialize_distributed
from hbjax.vi.convergence import Convergence

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--batch-size", type=int, default=None)
parser.add_argument("--coordinator", default=None)
parser.add_argument("--process-id", type=int, default=0)
args = parser.parse_args()
if args.coordinator is not None:
    initialize_distributed(DistributedConfig(args.coordinator, 2, args.process_id))
jax.config.update("jax_numpy_dtype_promotion", "standard")  # optax's Adam
data = hbjax.counts.elasticity_data(
    hbjax.simulate(n_units=48, n_periods=10, n_groups=3, seed=4).frame
)
mesh = hbjax.make_mesh()
model = data.model
guide = hbjax.make_guide("unitblock", model, loc=model.init_latents(data.rows))
# averaging begins at the first check, the fit stops at the first one after 50 averaged
# steps: about a hundred steps that go through every part of the loop (chunks of 25: a
# minibatch fit checks once a chunk; a step across processes costs ~30 ms on a CPU)
loose = Convergence(rhat=100.0, mcse=10.0, check_every=25, min_average=50)
result = hbjax.fit(
    model,
    guide,
    hbjax.Minibatches(data.rows, args.batch_size, mesh=mesh)
    if args.batch_size
    else hbjax.FullBatch(data.grid(mesh)),
    key=jax.random.key(0),
    steps=2000,
    convergence=loose,
    progress=False,
    chunk_size=25,
)
if jax.process_index() == 0:
    status = result.convergence
    leaves = {f"leaf{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(result.guide))}
    np.savez(
        args.out,
        steps=result.steps,
        average_from=-1 if status.average_from is None else status.average_from,
        converged=status.converged,
        **leaves,
    )
