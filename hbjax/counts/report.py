"""What a fit reports: tables on labels, its checks, ``summary.json`` and the files.

:class:`FitReport` is built by the library (:meth:`FitReport.build`) and writes every
output of ``hbjax fit`` (:meth:`FitReport.write`): ``elasticities.csv`` (each unit's price
elasticity with its finest group), ``groups.csv`` (the finest groups'), ``estimates.csv``
(every value on its labels), ``losses.csv``, ``summary.json``, the fitted model for
``hbjax predict`` and, asked for, ``plots/``. The command line parses, calls and prints.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shlex
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from .. import __version__
from ..vi.checks import UnitImportance, unit_importance
from ..vi.fit import FitResult
from ..vi.guide import GaussianGuide
from .check import PredictiveCheck, interval, predictive_check
from .fit import FitConfig
from .frame import CountData, price_slope
from .saved import save_fit
from .slopes import GLOBAL, UNIT

#: What ``hbjax fit`` writes in its ``--out`` folder (a folder holding none is refused).
FIT_FILES = (
    *("fit.json", "fit.eqx", "summary.json", "elasticities.csv", "groups.csv", "losses.csv"),
    "estimates.csv",  # --group a,b or --covariates (every value on its labels)
)
#: All a fit folder may hold (``hbjax check`` adds check.csv); anything else is the user's.
FIT_FOLDER = (*FIT_FILES, "encoding", "labels", "plots", "check.csv")
#: The statistics of every summary row.
STATS = ("mean", "sd", "q05", "q50", "q95")


@dataclasses.dataclass(frozen=True)
class FitReport:
    """A fit's tables, checks and ``summary.json``, ready to print or write.

    Attributes:
        data: the fitted table (:func:`hbjax.counts.from_frame`).
        result: the fit.
        tables: every value on its labels (:meth:`~hbjax.counts.CountData.summary`).
        predictive: the posterior predictive check (per group of ``summary["predictive_check"]
            ["level"]``), or ``None`` where the rows are not in this process.
        importance: the per-unit PSIS check of the guide, or ``None`` (skipped).
        summary: what ``summary.json`` holds.
    """

    data: CountData
    result: FitResult
    tables: dict[str, pd.DataFrame]
    predictive: PredictiveCheck | None
    importance: UnitImportance | None
    summary: dict

    @classmethod
    def build(
        cls,
        data: CountData,
        result: FitResult,
        config: FitConfig,
        *,
        source: str = "",
        samples: int = 1000,
        diagnostic_draws: int = 200,
        devices: int = 1,
        started: float | None = None,
    ) -> FitReport:
        """Summarise ``result`` and check it on ``data``'s rows (a saved fit's data has none).

        Args:
            data: the fitted table.
            result: the fit of ``data.model``.
            config: the fit's configuration (recorded).
            source: where the table came from (recorded as ``input``).
            samples: guide draws for summaries that are not exact (non-Gaussian guides).
            diagnostic_draws: draws per unit of the guide check (0: skip it).
            devices: devices the fit ran on (recorded).
            started: when the whole run began (``time.perf_counter()``): ``wall_seconds``
                counts from then, reading the table included (default: the fit's time).
        """
        key = jax.random.key(config.seed)
        tables = data.summary(result.guide, draws=samples, key=key)
        spec, levels = data.spec, list(data.levels)
        level = levels[-1] if levels else None
        rows_here = data.rows is not None and not data.on_disk  # the checks read every row
        predictive = importance = None
        if rows_here:
            predictive = predictive_check(
                data, result.guide, key=jax.random.fold_in(key, 3), level=level
            )
        if rows_here and diagnostic_draws and isinstance(result.guide, GaussianGuide):
            importance = unit_importance(
                data.model,
                result.guide,
                data.rows,
                key=jax.random.fold_in(key, 2),
                num_draws=diagnostic_draws,
            )
        price = price_slope(data)
        status = result.convergence
        summary = {
            "input": source,
            "n_obs": 0 if data.rows is None else len(data.rows.unit),
            "n_units": len(data.units),
            "n_groups": len(data.levels[levels[0]]) if levels else 0,
            "groups": {g: len(data.levels[g]) for g in levels},
            "n_periods": 0 if data.periods is None else len(data.periods),
            "covariates": [s.column for s in spec.slopes if s is not price] if spec else [],
            "steps": result.steps,
            "batch_size": result.batch_size,
            "epochs": result.epochs,
            "guide": config.guide,
            "rank": config.rank if config.guide == "lowrank" else None,
            "dependent": config.dependent,
            "gradient": config.gradient,
            "particles": config.particles,
            "alpha": config.alpha,
            "learning_rate": config.learning_rate,
            "precondition": config.precondition,
            "seed": config.seed,
            "checkpoint": config.checkpoint_dir,
            "price_centring": None if spec is None else spec.centre,
            "hierarchy": None if spec is None else spec.hierarchy,
            "learn_spreads": None if spec is None else spec.learn_spreads,
            "intercept_prior": None if spec is None else spec.intercept_prior,
            "likelihood": data.model.likelihood.name,
            "clip_log_rate": data.model.clip_log_rate,
            "dispersion": _row(tables["dispersion"]) if "dispersion" in tables else None,
            "final_loss": result.final_loss,
            "converged": result.converged,
            "averaged_from_step": None if status is None else status.average_from,
            "averaged_to_step": None if status is None else status.average_to,
            "mcse_of_means_in_sd": None if status is None else status.mcse,
            "mcse_of_means_in_sd_max": None if status is None else status.mcse_max,
            "worst_settled_mean": None if status is None else status.worst,
            "rhat": None if status is None else status.rhat,
            "summaries": tables["intercept"].attrs["summary"],
            "wall_seconds": result.wall_seconds
            if started is None
            else time.perf_counter() - started,
            "compile_seconds": result.compile_seconds,
            "iterations_per_second": result.iterations_per_second,
            "devices": devices,
            "processes": jax.process_count(),
            "backend": jax.default_backend(),
            "global_elasticity": None if price is None else _row(tables[f"{price.name}/global"]),
            "covariate_slopes": {
                s.column: _row(tables[f"{s.name}/{GLOBAL}"])
                for s in (spec.slopes if spec else ())
                if s is not price
            },
            "guide_check": _skipped(diagnostic_draws, rows_here, result.guide)
            if importance is None
            else importance.to_dict(data.units),
            "predictive_check": {"skipped": _ELSEWHERE}
            if predictive is None
            else {"level": level, **predictive.to_dict(_labels(data, level))},
            "hbjax_version": __version__,
            "jax_version": jax.__version__,
            "python_version": platform.python_version(),
        }
        return cls(data, result, tables, predictive, importance, summary)

    # --- tables --------------------------------------------------------------------------
    def elasticities(self) -> pd.DataFrame | None:
        """Each unit's price elasticity: ``unit, finest group, mean, sd, q05, q50, q95``."""
        price = price_slope(self.data)
        if price is None:
            return None
        table = self.tables[f"{price.name}/{UNIT}"]
        out = table.reset_index(names=self.data.spec.unit)[[self.data.spec.unit, *STATS]]
        if self.data.levels:
            finest = next(iter(self.data.levels))
            codes = np.asarray(self.data.model.table.levels[finest])
            out.insert(1, finest, np.asarray(self.data.levels[finest])[codes])
        return out

    def groups(self, level: str | None = None) -> pd.DataFrame | None:
        """The price elasticity of each group of ``level`` (default: the finest)."""
        price = price_slope(self.data)
        if price is None or not self.data.levels:
            return None
        level = level or next(iter(self.data.levels))
        table = self.tables.get(f"{price.name}/{level}")
        return None if table is None else table.reset_index(names=level)[[level, *STATS]]

    def estimates(self) -> pd.DataFrame:
        """Every value in one table: ``quantity, label, mean, sd, q05, q50, q95``."""
        parts = []
        for name, table in self.tables.items():
            labels = [
                ":".join(map(str, x)) if isinstance(x, tuple) else str(x) for x in table.index
            ]
            parts.append(table.reset_index(drop=True).assign(quantity=name, label=labels))
        return pd.concat(parts, ignore_index=True)[["quantity", "label", *STATS]]

    # --- text ----------------------------------------------------------------------------
    def lines(self, out: str, written: list[str]) -> list[str]:
        """What ``hbjax fit`` prints: the fit, its convergence and its checks.

        A line of the predictive check that flags the model starts ``warning:``. An
        unconverged fit's replicas say little about the likelihood: its check is shown,
        not judged.
        """
        summary, check = self.summary, self.predictive
        periods = f" x {summary['n_periods']} periods" if summary["n_periods"] else ""
        out_arg = shlex.quote(str(out))
        lines = [
            f"fitted {summary['n_units']} units{periods} ({summary['n_obs']} rows) in "
            f"{summary['wall_seconds']:.1f} s; global elasticity "
            f"{interval(summary['global_elasticity'])}; wrote {out}/{', '.join(written)} and "
            f"the fitted model (for `hbjax predict {out_arg} PRICES.csv`)",
            convergence_line(self.result),
        ]
        if (phi := summary["dispersion"]) is not None:
            lines.append(
                f"dispersion phi {phi['q50']:.3g} (90% interval {phi['q05']:.3g} to "
                f"{phi['q95']:.3g}): variance = mean + phi x mean^2"
            )
        if self.importance is not None:
            hint = ""
            if not self.importance.good and summary["price_centring"] is False:
                hint = "; price centring (drop --no-centring) often makes them normal"
            lines.append(f"guide check: {self.importance.verdict}{hint}")
        if check is not None and check.flagged and not self.result.converged:
            lines.append(
                "model check: not judged, the fit did not converge (replicas from an "
                f"unsettled fit say little about the likelihood): {check.figures}"
            )
        elif check is not None and check.flagged:
            problem = check.verdict.removeprefix("contradicted: ")
            lines.append(
                f"warning: the data contradict the {summary['likelihood']} model: {problem}"
            )
        elif check is not None:
            lines.append(f"model check: {check.verdict}")
        return lines

    # --- files ---------------------------------------------------------------------------
    def write(self, folder: str | Path, *, plots: bool = False) -> list[str]:
        """Write every output into ``folder`` (which must exist); returns the names written.

        ``elasticities.csv`` and ``groups.csv`` where the model has a price slope (and
        groups), ``estimates.csv``, ``losses.csv``, ``summary.json``, the fitted model
        (``fit.json``, ``fit.eqx``, ``labels/``) and with ``plots``, ``plots/``.
        """
        folder = Path(folder)
        written = []
        for name, table in (("elasticities", self.elasticities()), ("groups", self.groups())):
            if table is not None:
                table.to_csv(folder / f"{name}.csv", index=False)
                written.append(f"{name}.csv")
        self.estimates().to_csv(folder / "estimates.csv", index=False)
        losses = self.result.losses
        pd.DataFrame({"step": np.arange(len(losses)), "loss": losses}).to_csv(
            folder / "losses.csv", index=False
        )
        (folder / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        save_fit(self.data, self.result, folder)
        written += ["estimates.csv", "losses.csv", "summary.json"]
        if plots:
            self._plots(folder / "plots")
            written.append("plots/")
        return written

    def _plots(self, folder: Path) -> None:
        """``plots/``: the loss, the units around their groups, forests, the check.

        Each unit's price elasticity around its finest group, a forest of every level's
        elasticities, the predictive check per group.
        """
        from .plots import Summary, loss_trace, predictive_plot, save_figures, write_hierarchy_plots

        price, levels = price_slope(self.data), list(self.data.levels)
        if price is None or not levels:
            figures = [("loss.png", lambda: loss_trace(self.result))]
            if self.predictive is not None:
                figures.append(("predictive.png", lambda: predictive_plot(self.predictive)))
            save_figures(figures, folder)
            return
        overall = self.tables[f"{price.name}/{GLOBAL}"]
        units = self.elasticities()

        def level(name: str) -> Summary:
            return Summary(units, self.groups(name), overall, num_samples=0)

        check_level = self.summary["predictive_check"].get("level")
        write_hierarchy_plots(
            self.result,
            level(levels[0]),
            [level(name) for name in levels],
            folder,
            predictive=self.predictive,
            predictive_groups=None
            if check_level is None
            else [str(x) for x in self.data.levels[check_level]],
        )


#: What a check says where the rows are not at hand (a saved fit's data).
_ELSEWHERE = "the rows are not at hand, or on disk (a folder from hbjax prepare)"


def _skipped(draws: int, rows_here: bool, guide: object) -> dict[str, str]:  # noqa: FBT001
    if not draws:
        return {"skipped": "--diagnostic-draws 0"}
    if not rows_here:
        return {"skipped": _ELSEWHERE}
    return {"skipped": f"the {type(guide).__name__} guide is not Gaussian"}


def _labels(data: CountData, level: str | None) -> pd.Index | None:
    return None if level is None else data.levels[level]


def convergence_line(result: FitResult) -> str:
    """Whether ``result`` converged, the steps its guide averages and its Monte Carlo error."""
    status = result.convergence
    if status is None or status.average_from is None:
        return "not converged: the iterates never became stationary"
    state = "converged" if status.converged else "not converged"
    error = ""
    if status.mcse is not None:
        error = (
            f"; Monte Carlo error of the means {status.mcse:.3f} sd (median; the worst "
            f"{status.mcse_max:.3f}" + (f", {status.worst}" if status.worst else "") + ")"
        )
    return (
        f"{state}: the reported guide averages the iterates of steps {status.average_from}-"
        f"{status.average_to}{error}"
    )


def _row(table: pd.DataFrame) -> dict[str, float]:
    """The one row of a table as ``{mean, sd, q05, q50, q95}``."""
    row = table.iloc[0]
    return {k: float(row[k]) for k in STATS}


__all__ = ["FIT_FILES", "FIT_FOLDER", "FitReport", "convergence_line", "price_slope"]
