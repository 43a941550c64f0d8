"""The ``hbjax`` command: ``demo``, ``simulate``, ``prepare``, ``fit``, ``predict``, ``check``.

All on top of the public API.

A user mistake (bad file, column, value or flag) prints one line ``error: ...`` to stderr
and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import jax
import numpy as np
from jax.sharding import Mesh

from .. import __version__
from ..counts import fit_counts, load_fit, predict, prepare
from ..counts.check import check_lines, check_saved_fit
from ..counts.demo import demo as demo_lines
from ..counts.families import LIKELIHOODS
from ..counts.fit import DEFAULT_GUIDE, SEEDS, FitConfig
from ..counts.frame import INTERCEPT_PRIORS
from ..counts.report import FIT_FILES, FIT_FOLDER, FitReport
from ..counts.simulate import simulate
from ..extras import optional_import
from ..io.outputs import (
    AtomicFolder,
    OutputError,
    check_file_destination,
    is_within,
    write_file_atomically,
)
from ..io.tables import DataValidationError, DataWarning
from ..parallel.blocks import ShardingError, make_mesh
from ..parallel.hosts import DistributedConfig, initialize_distributed
from ..vi.checkpoint import CheckpointError
from ..vi.compilation import use_persistent_cache
from ..vi.convergence import Convergence
from ..vi.fit import ConvergenceWarning, NonFiniteLossError
from ..vi.guide import GUIDES
from ..vi.layers import HIERARCHIES
from ..vi.objectives import GRADIENTS
from .tables import COLUMN_FLAGS, column_arguments, count_data

USER_ERROR = 2


class UserError(Exception):
    """A mistake in the command line or its inputs; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line ``error: ...`` and exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``error: message`` (with the sub-command) and exit 2."""
        self.exit(USER_ERROR, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _number(
    kind: Callable[[str], object], accept: Callable[[object], bool], what: str
) -> Callable[[str], object]:
    """An argparse ``type``: ``kind(text)`` if ``accept`` takes it, else "expected ``what``"."""

    def parse(text: str) -> object:
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
#: posterior draws for 90% intervals: a 5% quantile of fewer than 20 is a minimum
_draws = _number(int, lambda v: v >= 20, "a positive integer of at least 20 draws (90% intervals)")
_seed = _number(int, lambda v: 0 <= v < SEEDS, f"a whole number from 0 to {SEEDS - 1}")
_positive_float = _number(float, lambda v: np.isfinite(v) and v > 0, "a positive number")
_finite_float = _number(float, np.isfinite, "a finite number")
_fraction = _number(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
_non_negative = _number(float, lambda v: np.isfinite(v) and v >= 0, "a number >= 0")
_devices = _number(
    lambda t: t if t == "all" else int(t),
    lambda v: v == "all" or v >= 1,
    "a number of devices or 'all'",
)


def _column_flags(command: argparse.ArgumentParser) -> None:
    helps = {
        "unit": "unit column (default: product)",
        "group": "group columns, finest first (default: category; e.g. subcategory,category)",
        "period": "period column (integers or dates)",
        "price": "price column (> 0)",
        "units": "counts column (integers >= 0)",
        "covariates": "more columns with a slope each, by the coarsest group (e.g. promo,feature)",
    }
    for flag, default in COLUMN_FLAGS.items():
        command.add_argument(f"--{flag}", default=default, help=helps[flag])


def build_parser() -> argparse.ArgumentParser:
    """The ``hbjax`` argument parser."""
    parser = _Parser(prog="hbjax", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hbjax {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = commands.add_parser("demo", help="simulate a catalogue, fit it, report recovery")
    demo.add_argument("--products", type=_positive_int, default=2000)
    demo.add_argument("--periods", type=_positive_int, default=52)
    demo.add_argument("--categories", type=_positive_int, default=10)
    demo.add_argument(
        "--steps", type=_positive_int, default=20000, help="the most steps (stops when converged)"
    )
    demo.add_argument("--seed", type=_seed, default=0)
    demo.add_argument("--devices", type=_devices, default="all", help="N or 'all' (default)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    sim = commands.add_parser("simulate", help="write a synthetic panel and its truth")
    sim.add_argument("--products", type=_positive_int, required=True)
    sim.add_argument("--periods", type=_positive_int, default=156)
    sim.add_argument("--categories", type=_positive_int, default=10)
    sim.add_argument("--missing", type=_fraction, default=0.15)
    sim.add_argument(
        "--dispersion",
        type=_non_negative,
        default=0.0,
        help="negative-binomial counts with variance mu + PHI mu^2 (default 0: Poisson)",
    )
    sim.add_argument("--seed", type=_seed, default=0)
    sim.add_argument("--out", required=True, help="output file, .csv or .parquet")

    prepare = commands.add_parser(
        "prepare",
        help="stream a table too large for memory into a folder for `fit --batch-size`",
    )
    prepare.add_argument("file", help="long table (.csv or .parquet): one row per (unit, period)")
    _column_flags(prepare)
    prepare.add_argument("--out", required=True, help="folder to write")
    prepare.add_argument(
        "--chunk-rows", type=_positive_int, default=1_000_000, help="rows read at once"
    )
    prepare.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    fit_cmd = commands.add_parser("fit", help="fit the elasticity model to a CSV/Parquet file")
    fit_cmd.add_argument(
        "file",
        help="long table (.csv or .parquet), one row per (unit, period); or a folder from "
        "`hbjax prepare` (with --batch-size; its column flags are the prepared ones)",
    )
    _column_flags(fit_cmd)
    fit_cmd.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="the most optimisation steps: the fit stops by itself once converged (averaged "
        "iterates, Monte Carlo error of the means <= 0.02 posterior sd); default 20000, with "
        "--batch-size 250 epochs where those are more",
    )
    fit_cmd.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="minibatch SVI: products per step (rounded up to a multiple of the block count); "
        "the table stays in host memory and only each batch goes to the devices",
    )
    fit_cmd.add_argument(
        "--guide",
        choices=GUIDES,
        default=DEFAULT_GUIDE,
        help=f"variational family (default: {DEFAULT_GUIDE}): meanfield; unitblock (each "
        "product's elasticity and intercept jointly normal); lowrank (diagonal + rank-r factor "
        "over all latents; not with --batch-size)",
    )
    fit_cmd.add_argument("--rank", type=_positive_int, default=8, help="rank of --guide lowrank")
    fit_cmd.add_argument(
        "--dependent",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each group's and product's elasticity follows its parent's draw in the guide "
        "(default: yes but for lowrank; --no-dependent: independent levels)",
    )
    fit_cmd.add_argument(
        "--gradient",
        choices=GRADIENTS,
        default=None,
        help="gradient estimator: dreg (the default for alpha 0), total (the default for other "
        "alphas), stl (alpha 1)",
    )
    fit_cmd.add_argument(
        "--diagnostic-draws",
        type=int,
        default=200,
        help="draws per product for the guide check (PSIS k-hat of each of up to 1,000 "
        "products' own latents given the shared ones; 0: skip)",
    )
    fit_cmd.add_argument("--particles", type=_positive_int, default=4)
    fit_cmd.add_argument("--alpha", type=_finite_float, default=0.0, help="Rényi alpha (0: IW)")
    fit_cmd.add_argument("--lr", type=_positive_float, default=0.01, help="initial learning rate")
    fit_cmd.add_argument(
        "--mcse",
        type=_positive_float,
        default=Convergence.mcse,
        help="stop when the Monte Carlo error of the averaged means and log sds is at most "
        f"this many posterior sds (median; the largest watched mean's at most "
        f"{Convergence.tail}x; default {Convergence.mcse}; the error falls as 1/sqrt(steps))",
    )
    fit_cmd.add_argument("--seed", type=_seed, default=0)
    fit_cmd.add_argument("--clip", action="store_true", help="clip the log-rate to [-4, 20]")
    fit_cmd.add_argument(
        "--no-centring",
        action="store_true",
        help="the article's raw log prices (default: each product's intercept is taken at its "
        "mean log price, which makes mean-field intervals honest; results are the same model)",
    )
    fit_cmd.add_argument(
        "--hierarchy",
        choices=HIERARCHIES,
        default="centred",
        help="latents of the elasticity hierarchy (default: centred, which keeps category "
        "intervals honest with a year of data per product; noncentred: the article's)",
    )
    fit_cmd.add_argument(
        "--learn-spreads",
        action="store_true",
        help="learn the sd of products' and groups' elasticities around their parents "
        "(half-normal priors at the fixed sds; centred only), reported in estimates.csv",
    )
    fit_cmd.add_argument(
        "--intercept-prior",
        choices=INTERCEPT_PRIORS,
        default="reference",
        help="where each product's N(0, 3) intercept prior sits: reference (default) at its "
        "mean price, so answers do not depend on the currency unit; zero: at a price of 1 "
        "in the data's unit, the article's (dollars and cents then give different answers)",
    )
    fit_cmd.add_argument(
        "--likelihood",
        choices=tuple(LIKELIHOODS),
        default="poisson",
        help="the counts' distribution: poisson (default, the article's) or negbin (negative "
        "binomial, variance mu + phi mu^2 with one dispersion phi: for overdispersed sales, "
        "where a Poisson fit's intervals are far too narrow)",
    )
    fit_cmd.add_argument(
        "--samples", type=_draws, default=1000, help="posterior draws (at least 20)"
    )
    fit_cmd.add_argument("--out", default="hbjax-out", help="output folder (default: hbjax-out)")
    fit_cmd.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="save the fit's state to DIR every --checkpoint-every steps (and at the end)",
    )
    fit_cmd.add_argument(
        "--checkpoint-every", type=_positive_int, default=1000, help="steps between checkpoints"
    )
    fit_cmd.add_argument(
        "--resume",
        action="store_true",
        help="continue the fit saved in --checkpoint DIR (same data, options and seed)",
    )
    fit_cmd.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    fit_cmd.add_argument(
        "--plots",
        action="store_true",
        help="also write OUT/plots/: loss, shrinkage, a forest per group level, the "
        "predictive check",
    )
    fit_cmd.add_argument(
        "--devices", type=_devices, default="all", help="devices to split rows over: N or 'all'"
    )
    predict_cmd = commands.add_parser(
        "predict", help="expected units at new prices for fitted products (a what-if)"
    )
    predict_cmd.add_argument("fit_dir", help="the --out folder of `hbjax fit`")
    predict_cmd.add_argument(
        "prices",
        help="CSV/Parquet: the unit column and a price column (> 0); optionally the period",
    )
    predict_cmd.add_argument(
        "--out", default=None, help="output file (default: PRICES.predictions.csv)"
    )
    predict_cmd.add_argument(
        "--samples", type=_draws, default=1000, help="posterior draws (at least 20)"
    )
    predict_cmd.add_argument("--seed", type=_seed, default=0)

    check_cmd = commands.add_parser(
        "check",
        help="check a fit's intervals against NUTS on a random subsample of products "
        '(needs BlackJAX: pip install "hbjax[blackjax]")',
    )
    check_cmd.add_argument("fit_dir", help="the --out folder of `hbjax fit`")
    check_cmd.add_argument(
        "file",
        help="the table the fit was fitted to (its columns are read as the fit read them)",
    )
    check_cmd.add_argument("--products", type=_positive_int, default=50, help="products to check")
    check_cmd.add_argument(
        "--chains", type=_positive_int, default=4, help="shared-latent draws, one chain each"
    )
    check_cmd.add_argument("--warmup", type=_positive_int, default=300, help="NUTS warm-up steps")
    check_cmd.add_argument("--draws", type=_positive_int, default=300, help="NUTS draws per chain")
    check_cmd.add_argument("--seed", type=_seed, default=0)
    check_cmd.add_argument("--out", default=None, help="table (default: FIT_DIR/check.csv)")

    hosts = fit_cmd.add_argument_group("many hosts (jax.distributed)")
    hosts.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator")
    hosts.add_argument("--num-processes", type=_positive_int, help="number of processes")
    hosts.add_argument("--process-id", type=int, help="this process, 0..num-processes-1")
    hosts.add_argument(
        "--timeout", type=_positive_int, default=60, help="seconds to wait for the others"
    )
    return parser


def run_demo(args: argparse.Namespace) -> int:
    """``hbjax demo``: simulate, fit, and report recovery of the known truth."""
    shape = {"products": args.products, "periods": args.periods, "categories": args.categories}
    mesh, progress = _mesh(args.devices), not args.no_progress
    for line in demo_lines(**shape, steps=args.steps, seed=args.seed, mesh=mesh, progress=progress):
        print(line)
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    """``hbjax simulate``: write a synthetic panel and ``FILE.truth.csv``."""
    out = Path(args.out)
    if not out.name.lower().endswith((".csv", ".parquet")):
        raise UserError(f"--out must end in .csv or .parquet; got {args.out!r}.")
    check_file_destination(out)
    sim = simulate(
        n_units=args.products,
        n_periods=args.periods,
        n_groups=args.categories,
        missing=args.missing,
        dispersion=args.dispersion,
        seed=args.seed,
    )
    truth_path = sim.write(out)
    print(f"wrote {len(sim.frame)} rows to {out} and the truth to {truth_path}")
    return 0


def _mesh(devices: str | int) -> Mesh:
    try:
        return make_mesh(None if devices == "all" else devices)
    except ShardingError as exc:
        raise UserError(f"--devices: {exc}") from None


def _join_hosts(args: argparse.Namespace) -> None:
    """Join a multi-host run when --coordinator is given (before any other JAX work)."""
    try:
        config = DistributedConfig.from_flags(
            args.coordinator, args.num_processes, args.process_id, args.timeout
        )
        if config is not None and args.devices != "all":
            raise ShardingError(
                "with several hosts, rows are split over all devices: drop --devices."
            )
        if config is not None:
            initialize_distributed(config)
    except ShardingError as exc:
        raise UserError(str(exc)) from None


def run_prepare(args: argparse.Namespace) -> int:
    """``hbjax prepare``: stream a table into a folder for ``hbjax fit --batch-size``."""
    out = Path(args.out)
    if not args.out.strip() or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {args.out!r} is empty or not a folder; name a folder.")
    start = time.perf_counter()
    data = prepare(
        args.file,
        out,
        **column_arguments(args),
        chunk_rows=args.chunk_rows,
        progress=not args.no_progress,
    )
    groups = ", ".join(f"{len(v)} {g}" for g, v in data.levels.items())
    print(
        f"wrote {len(data.units)} units x {len(data.periods)} periods ({len(data.rows.unit)} "
        f"rows{', ' + groups if groups else ''}) to {out} in {time.perf_counter() - start:.1f} "
        f"s; fit it with `hbjax fit {shlex.quote(str(out))} --batch-size B`"
    )
    return 0


def _fit_config(args: argparse.Namespace) -> FitConfig:
    """The library's configuration from the flags (an impossible combination: one line)."""
    try:
        return FitConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            guide=args.guide,
            rank=args.rank,
            dependent=args.dependent,
            gradient=args.gradient,
            particles=args.particles,
            alpha=args.alpha,
            learning_rate=args.lr,
            mcse=args.mcse,
            seed=args.seed,
            checkpoint_dir=args.checkpoint,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            progress=not args.no_progress and jax.process_index() == 0,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None


def run_fit(args: argparse.Namespace) -> int:
    """``hbjax fit``: fit a file and write elasticities, groups, losses and a summary."""
    if args.diagnostic_draws < 0 or 0 < args.diagnostic_draws < 50:
        raise UserError(
            f"--diagnostic-draws must be 0 (skip) or at least 50; got {args.diagnostic_draws}."
        )
    if args.resume and args.checkpoint is None:
        raise UserError("--resume needs --checkpoint DIR (the folder of the fit to continue).")
    if args.plots:  # before the fit, not after it
        try:
            optional_import("matplotlib", purpose="--plots")
        except ImportError as exc:
            raise UserError(str(exc)) from None
    config = _fit_config(args)
    if args.checkpoint is not None and is_within(args.checkpoint, args.out):
        raise UserError(
            f"--checkpoint {args.checkpoint!r} lies in --out {args.out!r}, which a finished fit "
            "replaces whole; put the checkpoints beside it (e.g. --checkpoint "
            f"{args.out.rstrip('/')}-checkpoint)."
        )
    _join_hosts(args)
    # only process 0 writes; checked (and staged) before the fit, replaced only when complete
    folder = None
    if jax.process_index() == 0:
        folder = AtomicFolder(args.out, owns=FIT_FILES, known=FIT_FOLDER)
    try:
        return _fit_table(args, config, folder)
    except BaseException:
        if folder is not None:
            folder.discard()
        raise


def _fit_table(args: argparse.Namespace, config: FitConfig, folder: AtomicFolder | None) -> int:
    """``hbjax fit`` of a table: the count model its flags name, and every output."""
    start = time.perf_counter()
    mesh = _mesh(args.devices)
    data = count_data(args)
    if data.on_disk and args.batch_size is None:
        raise UserError(
            f"{args.file!r} is a folder from `hbjax prepare`: fit it with --batch-size (or fit "
            "the original table without it)."
        )
    if args.batch_size is not None and args.batch_size >= len(data.units):
        raise UserError(
            f"--batch-size {args.batch_size} is not smaller than the number of products "
            f"({len(data.units)}); leave it out to fit the full batch."
        )
    try:
        result = fit_counts(data, config, mesh=mesh)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    report = FitReport.build(
        data,
        result,
        config,
        source=str(args.file),
        samples=args.samples,
        diagnostic_draws=args.diagnostic_draws,
        devices=mesh.size,
        started=start,
    )
    if folder is None:  # only process 0 writes outputs
        return 0
    try:
        written = report.write(folder.staging, plots=args.plots)
        folder.commit()
    except OSError as exc:
        raise UserError(f"cannot write the results to {args.out!r}: {exc.strerror}.") from None
    for line in report.lines(args.out, written):
        print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """``hbjax predict``: expected units at new prices from a saved fit."""
    out = Path(args.out) if args.out is not None else Path(str(args.prices) + ".predictions.csv")
    fitted = [Path(args.fit_dir) / name for name in FIT_FOLDER]  # the fit's own files
    check_file_destination(out, inputs=(*fitted, args.prices))  # before the work
    saved = load_fit(args.fit_dir)
    scenarios, key = saved.read_table(args.prices), jax.random.key(args.seed)
    found = predict(saved.data, saved.guide, scenarios, num_samples=args.samples, key=key)
    write_file_atomically(out, lambda path: found.to_csv(path, index=False))
    print(
        f"predicted expected {saved.data.spec.counts} for {len(found)} rows "
        f"({saved.info['guide']} guide, {args.samples} draws, 90% intervals); wrote {out}"
    )
    return 0


def run_check(args: argparse.Namespace) -> int:
    """``hbjax check``: a saved fit's product intervals against NUTS, and per-product k-hat."""
    if args.warmup < 10 or args.draws < 20:
        raise UserError(
            f"--warmup must be >= 10 and --draws >= 20; got {args.warmup}, {args.draws}."
        )
    default = Path(args.fit_dir) / "check.csv"
    out = check_file_destination(args.out if args.out is not None else default)
    try:
        table, nuts, importance = check_saved_fit(
            load_fit(args.fit_dir),
            args.file,
            key=jax.random.key(args.seed),
            num_units=args.products,
            num_shared=args.chains,
            warmup=args.warmup,
            draws=args.draws,
        )
    except (ValueError, ImportError) as exc:
        if isinstance(exc, DataValidationError):
            raise
        raise UserError(str(exc)) from None
    write_file_atomically(out, lambda path: table.to_csv(path, index=False))
    print("\n".join(check_lines(table, nuts, importance, str(out))))
    return 0


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    """Every warning as one line ``warning: ...`` (``warnings.showwarning``'s signature).

    hbjax's own warnings (data, convergence) as they are; others (NumPy, pandas, JAX) with
    their category and where they came from, never Python's two-line format.
    """
    del file, line
    if issubclass(category, DataWarning | ConvergenceWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        text = " ".join(str(message).split())
        where = f"{Path(filename).name}:{lineno}"
        print(f"warning: {text} ({category.__name__} in {where})", file=sys.stderr)


class _Terminated(Exception):
    """SIGTERM arrived (a job scheduler ending the run)."""


def _on_sigterm(signum: int, frame: object) -> NoReturn:
    del signum, frame
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hbjax`` command; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # bad flags (status 2, one line) or --help/--version (0)
        return int(exit_.code or 0)
    commands = {
        "demo": run_demo,
        "simulate": run_simulate,
        "prepare": run_prepare,
        "fit": run_fit,
        "predict": run_predict,
        "check": run_check,
    }
    if args.command in ("demo", "fit", "check"):
        use_persistent_cache()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)  # unwinds: staging removed
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", DataWarning)
            warnings.showwarning = _show_warning
            return commands[args.command](args)
    except (UserError, DataValidationError, CheckpointError, OutputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print(
            "error: terminated (SIGTERM); nothing was written (a --checkpoint keeps the last "
            "saved step: --resume continues it)",
            file=sys.stderr,
        )
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
