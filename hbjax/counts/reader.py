"""Tables of any size into count data: two passes over chunks of rows.

:func:`~hbjax.counts.from_frame` (one chunk, in memory) and :func:`write_rows` (a CSV or
Parquet file read in chunks into memory-mapped ``.npy`` files, for tables larger than
memory: ``hbjax prepare``) share every check, message and warning, and the encoding:

1. validate each chunk; collect the labels (units with their groups, effect cells,
   periods) and per-unit sums (rows, the weights and weighted covariates of the centres,
   each covariate's range);
2. write each row's columns at its place in unit order (rows of a unit in file order):
   what :meth:`hbjax.UnitRows.build` would give.

Memory: one chunk plus about 100 bytes per unit and per cell; a folder holds 28 bytes per
row (the article's model) on disk. :func:`read_rows` opens a folder as
:class:`~hbjax.counts.CountData` whose rows stay on disk (minibatches read the units they
draw).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.scipy.special import gammaln
from tqdm.auto import tqdm

from .._types import float_dtype
from ..io.outputs import AtomicFolder, OutputError
from ..io.tables import (
    DataValidationError,
    DataWarning,
    check_counts,
    check_spaces,
    csv_options,
    duplicate_pair_error,
    factorize,
    period_values,
    readable_kind,
    reader_kind,
    shown,
    warn_constant_units,
    warn_lone_groups,
    warn_no_sales,
    which_rows,
    write_labels,
)
from ..parallel.rows import UnitRows
from .families import AbstractCountLikelihood
from .frame import (
    CountData,
    CountSpec,
    _cells,
    _covariate,
    _finite,
    _levels,
    build_model,
    cell_groups,
    check_columns,
    check_spec,
    checked_model_options,
)
from .regression import UnitTable
from .slopes import UNIT

#: Format marker of a rows folder (``store.json``).
ROWS_FORMAT = "hbjax-rows-2"  # 2: each covariate's mean and sd (``covariates``)
_COMPACT_EVERY = 16  # chunks between merges of the collected labels and sums
_CHECK_ROWS = 1 << 23  # rows per block of the final (unit, period) duplicate check


@dataclasses.dataclass
class _Labels:
    """Pass 1's result: every label and the per-unit sums, sorted as the codes go."""

    units: pd.Index
    levels: dict[str, pd.Index]
    unit_level: dict[str, np.ndarray]
    cells: dict[str, pd.Index]
    periods: pd.Index | None
    unit_rows: np.ndarray
    mean: dict[str, np.ndarray]
    standard: dict[str, tuple[float, float]]
    constant: dict[str, np.ndarray]
    span: dict[str, tuple[float, float]]
    n_rows: int
    chunks: int
    sales: bool


def read_chunks(
    chunks: Callable[[], Iterable[pd.DataFrame]],
    spec: CountSpec,
    *,
    one_row_per_period: bool = False,
    allocate: Callable[[str, type | np.dtype, int], np.ndarray] | None = None,
    bar: tqdm | None = None,
    likelihood: AbstractCountLikelihood | None = None,
) -> tuple[CountData, _Labels]:
    """The count data of the rows ``chunks()`` yields (called once per pass).

    Args:
        chunks: yields the table's rows in chunks, each indexed by the rows' positions
            (named in errors); the same chunks on both calls.
        spec: what the table means (:class:`~hbjax.counts.CountSpec`).
        one_row_per_period: refuse a unit with two rows in one period.
        allocate: ``(name, dtype, rows) -> array`` for each row column (default: in
            memory; :func:`write_rows`: a memory map).
        bar: a progress bar to advance by the rows read.
        likelihood: the likelihood module (default: the one ``spec`` names).

    Returns:
        The data and pass 1's labels.
    """
    allocate = allocate or (lambda _name, dtype, n: np.empty(n, dtype))
    check_spec(spec)  # once: no chunk can mend it
    labels = _scan(chunks(), spec, bar)
    rows, period = _place_rows(chunks(), spec, labels, allocate, one_row_per_period, bar)
    if one_row_per_period and period is not None and labels.chunks > 1:  # pairs across chunks
        _check_pairs(rows, period, spec, labels)
    return _count_data(spec, labels, rows, period, likelihood), labels


def _values(
    chunk: pd.DataFrame, spec: CountSpec
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
    """A chunk's counts, covariates (logged where asked) and offset, checked."""
    y = check_counts(chunk, spec.counts)
    x = {s.name: _covariate(chunk, s) for s in spec.slopes}
    offset = None if spec.offset is None else _finite(chunk, spec.offset)
    return y, x, offset


def _unit_sums(chunk: pd.DataFrame, spec: CountSpec, y: np.ndarray, x: dict) -> pd.DataFrame:
    """Per unit label of the chunk: rows, ``sum w``, ``sum w x``, min and max of ``x``."""
    codes, labels = pd.factorize(chunk[spec.unit])
    n = len(labels)
    w = y + 0.5
    sums = {
        "rows": np.bincount(codes, minlength=n).astype(np.float64),
        "w": np.bincount(codes, w, n),
    }
    for name, values in x.items():
        sums[f"wx {name}"] = np.bincount(codes, w * values, n)
        low, high = np.full(n, np.inf), np.full(n, -np.inf)
        np.minimum.at(low, codes, values)
        np.maximum.at(high, codes, values)
        sums[f"low {name}"], sums[f"high {name}"] = low, high
    return pd.DataFrame(sums, index=labels)


def _merge_sums(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Per-unit sums of several chunks added up (minima and maxima kept)."""
    if len(parts) == 1:
        return parts[0]
    table = pd.concat(parts)
    how = {
        c: "min" if c.startswith("low ") else "max" if c.startswith("high ") else "sum"
        for c in table
    }
    return table.groupby(level=0, sort=False).agg(how)


def _scan(chunks: Iterable[pd.DataFrame], spec: CountSpec, bar: tqdm | None) -> _Labels:
    """Pass 1: check every chunk; collect the labels and the per-unit sums."""
    label_columns = [spec.unit, *spec.groups]
    units: list[pd.DataFrame] = []
    combos: dict[str, list[pd.DataFrame]] = {e.name: [] for e in spec.effects}
    periods: list[pd.Series] = []
    sums: list[pd.DataFrame] = []
    moments = _Moments()
    n_rows = n_chunks = 0
    sales = False
    for chunk in chunks:
        check_columns(chunk, spec)
        y, x, _ = _values(chunk, spec)
        sales = sales or bool(np.any(y > 0))
        moments.add(x)
        units.append(chunk[label_columns].drop_duplicates())
        for effect in spec.effects:
            combos[effect.name].append(chunk[list(effect.labels)].drop_duplicates())
        if spec.period is not None:
            periods.append(pd.Series(pd.unique(chunk[spec.period]), name=spec.period))
        sums.append(_unit_sums(chunk, spec, y, x))
        n_rows, n_chunks = n_rows + len(chunk), n_chunks + 1
        if n_chunks % _COMPACT_EVERY == 0:
            units = [pd.concat(units).drop_duplicates()]
            combos = {k: [pd.concat(v).drop_duplicates()] for k, v in combos.items()}
            periods = (
                [pd.Series(pd.unique(pd.concat(periods)), name=spec.period)] if periods else []
            )
            sums = [_merge_sums(sums)]
        if bar is not None:
            bar.update(len(chunk))
    if n_rows == 0:
        raise DataValidationError("the table is empty; it needs at least one row.")
    table = pd.concat(units).drop_duplicates() if len(units) > 1 else units[0]
    unit_codes, unit_labels = factorize(table[spec.unit])
    n_units = len(unit_labels)
    check_spaces(unit_labels, spec.unit)
    levels, unit_level = _levels(table, spec.unit, unit_codes, n_units, spec.groups)
    for group in spec.groups:
        check_spaces(levels[group], group)
    if n_units < 2:
        raise DataValidationError(
            f"the table has a single unit ({shown(unit_labels[0])} in column {spec.unit!r}); a "
            "hierarchical model pools several units: fit at least 2."
        )
    cells = {}
    for effect in spec.effects:
        parts = combos[effect.name]
        cells[effect.name] = _cells(
            pd.concat(parts).drop_duplicates() if len(parts) > 1 else parts[0], effect
        )[1]
    period_labels = None
    if spec.period is not None:
        _, period_labels = factorize(pd.Series(pd.unique(pd.concat(periods)), name=spec.period))
        if len(period_labels) < 2:
            raise DataValidationError(
                f"the table has a single period ({shown(period_labels[0])} in column "
                f"{spec.period!r}); slopes are identified from covariates changing over time: "
                "give at least 2 periods."
            )
    per_unit = _merge_sums(sums)
    per_unit = per_unit.iloc[np.argsort(unit_labels.get_indexer(per_unit.index), kind="stable")]
    mean, constant, span = {}, {}, {}
    for slope in spec.slopes:
        low, high = per_unit[f"low {slope.name}"], per_unit[f"high {slope.name}"]
        span[slope.name] = (float(low.min()), float(high.max()))
        mean[slope.name] = per_unit[f"wx {slope.name}"].to_numpy() / per_unit["w"].to_numpy()
        constant[slope.name] = np.flatnonzero((low == high).to_numpy())
    return _Labels(
        units=unit_labels,
        levels=levels,
        unit_level=unit_level,
        cells=cells,
        periods=period_labels,
        unit_rows=per_unit["rows"].to_numpy().astype(np.int64),
        mean=mean,
        standard={s.name: (0.0, 1.0) if s.log else moments.standard(s.name) for s in spec.slopes},
        constant=constant,
        span=span,
        n_rows=n_rows,
        chunks=n_chunks,
        sales=sales,
    )


class _Moments:
    """Running count, mean and spread of each covariate over the rows (shifted sums)."""

    def __init__(self) -> None:
        self.shift: dict[str, float] = {}
        self.sums: dict[str, np.ndarray] = {}

    def add(self, x: dict[str, np.ndarray]) -> None:
        """Add a chunk's covariates."""
        for name, values in x.items():
            if not len(values):
                continue
            shift = self.shift.setdefault(name, float(values[0]))
            d = np.asarray(values, np.float64) - shift
            self.sums[name] = self.sums.get(name, 0.0) + np.array([len(d), d.sum(), d @ d])

    def standard(self, name: str) -> tuple[float, float]:
        """``(mean, sd)`` of covariate ``name`` (sd 1 where the column is constant)."""
        n, first, second = self.sums[name]
        mean = first / n
        sd = float(np.sqrt(max(second / n - mean * mean, 0.0)))
        return float(self.shift[name] + mean), sd if np.isfinite(sd) and sd > 0 else 1.0


def _place_rows(
    chunks: Iterable[pd.DataFrame],
    spec: CountSpec,
    labels: _Labels,
    allocate: Callable[[str, type | np.dtype, int], np.ndarray],
    one_row_per_period: bool,  # noqa: FBT001
    bar: tqdm | None,
) -> tuple[UnitRows, np.ndarray | None]:
    """Pass 2: each row's columns at its place in unit order; the rows' periods."""
    n = labels.n_rows
    unit = allocate("unit", np.int32, n)
    floats = float_dtype()
    weight = allocate("weight", floats, n)
    columns: dict = {
        "counts": allocate("counts", floats, n),
        "log_factorial": allocate("log_factorial", floats, n),
        "x": {s.name: allocate(f"x_{i}", floats, n) for i, s in enumerate(spec.slopes)},
        "cells": {e.name: allocate(f"cells_{i}", np.int32, n) for i, e in enumerate(spec.effects)},
    }
    if spec.offset is not None:
        columns["offset"] = allocate("offset", floats, n)
    period = None if spec.period is None else allocate("period", np.int32, n)
    starts = np.r_[0, np.cumsum(labels.unit_rows)][:-1]
    for chunk in chunks:
        y, x, offset = _values(chunk, spec)
        u = labels.units.get_indexer(chunk[spec.unit]).astype(np.int64)
        order = np.argsort(u, kind="stable")
        first = np.r_[0, np.flatnonzero(np.diff(u[order])) + 1]
        rank = np.arange(len(u)) - np.repeat(first, np.diff(np.r_[first, len(u)]))
        dest = np.empty(len(u), np.int64)
        dest[order] = starts[u[order]] + rank
        starts += np.bincount(u, minlength=len(starts))
        if period is not None:
            p = labels.periods.get_indexer(chunk[spec.period])
            if one_row_per_period:
                _check_chunk_pairs(chunk, spec, u * len(labels.periods) + p)
            period[dest] = p
        unit[dest] = u
        weight[dest] = 1.0
        columns["counts"][dest] = y
        columns["log_factorial"][dest] = np.asarray(gammaln(jnp.asarray(y + 1.0, floats)))
        for name, values in x.items():
            columns["x"][name][dest] = values
        for effect in spec.effects:
            columns["cells"][effect.name][dest] = _cell_codes(
                chunk, effect, labels.cells[effect.name]
            )
        if offset is not None:
            columns["offset"][dest] = offset
        if bar is not None:
            bar.update(len(chunk))
    rows = UnitRows(unit=unit, weight=weight, columns=columns, n_units=len(labels.units))
    return rows, period


def _cell_codes(chunk: pd.DataFrame, effect: object, cells: pd.Index) -> np.ndarray:
    """Each row's cell of ``effect`` among the table's ``cells``."""
    if len(effect.labels) == 1:
        return cells.get_indexer(chunk[effect.labels[0]])
    return cells.get_indexer(pd.MultiIndex.from_frame(chunk[list(effect.labels)]))


def _check_chunk_pairs(chunk: pd.DataFrame, spec: CountSpec, key: np.ndarray) -> None:
    """No (unit, period) pair twice in the chunk, the rows named."""
    if len(np.unique(key)) == len(key):
        return
    twice = pd.Series(key).duplicated(keep=False).to_numpy()
    first = chunk[twice].iloc[0]
    roles = {"unit": spec.unit, "period": spec.period}
    where = f"{which_rows(chunk, twice)} are duplicates"
    raise duplicate_pair_error(roles, first[spec.unit], first[spec.period], where)


def _check_pairs(rows: UnitRows, period: np.ndarray, spec: CountSpec, labels: _Labels) -> None:
    """No (unit, period) pair in two chunks: checked over blocks of whole units."""
    bounds = np.r_[0, np.cumsum(labels.unit_rows)]
    n_periods = len(labels.periods)
    lo = 0
    while lo < len(labels.units):
        hi = max(int(np.searchsorted(bounds, bounds[lo] + _CHECK_ROWS, "right")) - 1, lo + 1)
        part = slice(bounds[lo], bounds[hi])
        key = np.sort(np.asarray(rows.unit[part], np.int64) * n_periods + period[part])
        twice = np.flatnonzero(np.diff(key) == 0)
        if len(twice):
            u, t = divmod(int(key[twice[0]]), n_periods)
            roles = {"unit": spec.unit, "period": spec.period}
            where = "in rows of different chunks of the file"
            raise duplicate_pair_error(roles, labels.units[u], labels.periods[t], where)
        lo = hi


def _count_data(
    spec: CountSpec,
    labels: _Labels,
    rows: UnitRows,
    period: np.ndarray | None,
    likelihood: AbstractCountLikelihood | None = None,
) -> CountData:
    """The model ``spec`` describes over ``labels``' units, and its rows."""
    reference = spec.intercept_prior == "reference"
    table = UnitTable(
        levels={g: jnp.asarray(labels.unit_level[g]) for g in spec.groups},
        centre={k: jnp.asarray(v, float_dtype()) for k, v in labels.mean.items()},
        reference={
            k: jnp.asarray(v if reference else 0 * v, float_dtype()) for k, v in labels.mean.items()
        },
    )
    sizes = {g: len(labels.levels[g]) for g in spec.groups}
    model = build_model(
        spec,
        table,
        sizes,
        {e: len(c) for e, c in labels.cells.items()},
        likelihood,
        cell_groups(spec, labels.cells, labels.levels),
        labels.standard,
    )
    return CountData(
        model, rows, labels.units, labels.levels, labels.cells, period, labels.periods, spec
    )


def warn_weak(spec: CountSpec, labels: _Labels) -> None:
    """Warn about what the table says little of: constant covariates, lone groups, no sales."""
    for slope in spec.slopes:
        low, high = labels.span[slope.name]
        if low == high:  # the table says nothing about this slope
            value = f"{np.exp(low) if slope.log else low:g}"
            warnings.warn(
                f"column {slope.column!r} is {value} in every row: "
                f"the data say nothing about its slope, so its estimates are the prior's. Drop "
                "the column, or check that it is the one you meant.",
                DataWarning,
                stacklevel=4,
            )
        elif UNIT in slope.over:
            what = f"slopes of {slope.name!r}"
            warn_constant_units(
                labels.constant[slope.name], labels.units, spec.unit, slope.column, what
            )
    if spec.groups:
        first = spec.groups[0]
        warn_lone_groups(labels.unit_level[first], labels.levels[first], first, "slope")
    if not labels.sales:
        warn_no_sales(spec.counts)


def file_chunks(
    path: Path, spec: CountSpec, chunk_rows: int
) -> Callable[[], Iterator[pd.DataFrame]]:
    """A file's rows in chunks of ``chunk_rows``, indexed by position; labels as text.

    Label columns are read from a CSV exactly as written (:func:`hbjax.io.tables.csv_options`);
    periods parsed as integers or dates, one kind throughout the file.
    """
    kind = readable_kind(path)
    wanted = [spec.unit, spec.counts, *spec.groups, *(s.column for s in spec.slopes)]
    wanted += [c for e in spec.effects for c in e.labels]
    wanted += [c for c in (spec.offset, spec.period) if c is not None]
    columns = list(dict.fromkeys(wanted))

    def chunks() -> Iterator[pd.DataFrame]:
        offset, period_kind = 0, None
        try:
            if kind == "CSV":
                options = csv_options(path, spec.label_columns())
                read: Iterator[pd.DataFrame] = pd.read_csv(
                    path, usecols=columns, chunksize=chunk_rows, **options
                )
            else:
                import pyarrow.parquet as pq

                # pre_buffer=False: pyarrow's default keeps ~3 MB per batch read
                reader = pq.ParquetFile(path, pre_buffer=False)
                batches = reader.iter_batches(batch_size=chunk_rows, columns=columns)
                read = (batch.to_pandas() for batch in batches)
            for chunk in read:
                if offset and not len(chunk):
                    continue
                chunk.index = pd.RangeIndex(offset, offset + len(chunk))
                offset += len(chunk)
                if spec.period is not None and spec.period in chunk.columns and len(chunk):
                    chunk[spec.period] = period_values(chunk, spec.period)
                    is_date = pd.api.types.is_datetime64_any_dtype(chunk[spec.period])
                    now = "dates" if is_date else "integers"
                    if period_kind not in (None, now):
                        raise DataValidationError(
                            f"column {spec.period!r} holds {period_kind} in earlier rows and "
                            f"{now} from row {chunk.index[0]}; use one kind of period throughout."
                        )
                    period_kind = now
                yield chunk
        except (DataValidationError, GeneratorExit):
            raise
        except PermissionError:
            raise DataValidationError(f"cannot read {str(path)!r}: permission denied.") from None
        except Exception as exc:  # noqa: BLE001 - any parser failure is a user-facing bad file
            message = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise DataValidationError(
                f"cannot read {str(path)!r} as {kind} (looked for columns {columns}): {message}"
            ) from None

    return chunks


def _row_count(path: Path) -> int | None:
    """Rows of a Parquet file from its metadata (a CSV's are unknown until read)."""
    if reader_kind(path) != "Parquet" or not path.is_file():
        return None
    try:
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # noqa: BLE001 - the reading pass reports a bad file properly
        return None


def is_rows_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder written by :func:`write_rows`."""
    return (Path(path) / "store.json").is_file()


def write_rows(
    path: str | os.PathLike[str],
    directory: str | os.PathLike[str],
    spec: CountSpec,
    *,
    one_row_per_period: bool = False,
    chunk_rows: int = 1_000_000,
    progress: bool = True,
) -> CountData:
    """Stream a CSV or Parquet file into a folder of memory-mapped rows (``hbjax prepare``).

    The file is read twice in chunks (see the module doc); the folder is written into a
    staging folder and renamed into place once complete, so a failure leaves an earlier
    folder as it was.

    Args:
        path: a ``.csv`` (``.csv.gz``) or ``.parquet`` file.
        directory: the folder to write: new, empty, or an earlier rows folder.
        spec: the table's columns and what they mean (its model options are defaults:
            :func:`read_rows` takes the fit's).
        one_row_per_period: refuse a unit with two rows in one period.
        chunk_rows: rows read at once.
        progress: show a progress bar over the two passes.

    Returns:
        The folder opened (:func:`read_rows`).

    Raises:
        DataValidationError: as :func:`~hbjax.counts.from_frame`, rows named by their
            0-based position in the file.
        hbjax.io.outputs.OutputError: ``directory`` holds other files, or cannot be written.
    """
    if (
        isinstance(chunk_rows, bool)
        or not isinstance(chunk_rows, int | np.integer)
        or chunk_rows < 1
    ):
        raise ValueError(f"chunk_rows must be a positive int; got {chunk_rows!r}.")
    path, directory = Path(path), Path(directory)
    if readable_kind(path) and not path.is_file():
        raise DataValidationError(
            f"{str(path)!r} is not a regular file (a named pipe?): the table is read twice, a "
            "pipe only once. Write it to a file first."
        )
    total = _row_count(path)
    try:
        with (
            AtomicFolder(directory, owns=("store.json",), what="the rows folder") as staging,
            tqdm(
                total=None if total is None else 2 * total,
                desc="reading (2 passes: labels and checks, then rows)",
                unit="row",
                unit_scale=True,
                disable=not progress,
            ) as bar,
        ):
            data, labels = read_chunks(
                file_chunks(path, spec, int(chunk_rows)),
                spec,
                one_row_per_period=one_row_per_period,
                allocate=lambda name, dtype, n: _on_disk(staging / f"{name}.npy", dtype, n),
                bar=bar,
            )
            arrays = [data.rows.unit, data.rows.weight, data.period, *_leaves(data.rows.columns)]
            for array in arrays:
                if array is not None:
                    array.flush()
            _write_meta(staging, data, labels, str(path))
    except OSError as exc:  # a full disk, a lost mount: nothing half-written is left
        raise OutputError(
            f"cannot write the rows folder {str(directory)!r}: {exc.strerror or exc}."
        ) from None
    warn_weak(spec, labels)
    return read_rows(directory)


def _on_disk(path: Path, dtype: type | np.dtype, n: int) -> np.memmap:
    """A memory-mapped ``.npy`` of ``n`` entries, its disk space reserved now.

    Without the reservation a full disk shows only when a page is written back, as a
    ``SIGBUS`` that kills the process; reserved, it is an ``OSError`` here.
    """
    array = np.lib.format.open_memmap(path, "w+", dtype, (n,))
    with open(path, "r+b") as handle:
        size = os.fstat(handle.fileno()).st_size
        if hasattr(os, "posix_fallocate") and size:
            os.posix_fallocate(handle.fileno(), 0, size)
    return array


def _leaves(tree: dict) -> list[np.ndarray]:
    return [v for x in tree.values() for v in (_leaves(x) if isinstance(x, dict) else [x])]


def _write_meta(folder: Path, data: CountData, labels: _Labels, source: str) -> None:
    """Labels, per-unit arrays and ``store.json`` (written last)."""
    from .saved import named_labels

    (folder / "labels").mkdir()
    kinds = {
        name: write_labels(index, folder / "labels", name)
        for name, index in named_labels(data).items()
    }
    for i, group in enumerate(data.spec.groups):
        np.save(folder / f"level_{i}.npy", labels.unit_level[group].astype(np.int32))
    for i, slope in enumerate(data.spec.slopes):
        np.save(folder / f"mean_{i}.npy", labels.mean[slope.name])
    store = {
        "format": ROWS_FORMAT,
        "spec": data.spec.to_json(),
        "n_rows": labels.n_rows,
        "covariates": labels.standard,
        "labels": kinds,
        "source": source,
    }
    (folder / "store.json").write_text(json.dumps(store, indent=2) + "\n")


def read_rows(directory: str | os.PathLike[str], **options: object) -> CountData:
    """Open a folder written by :func:`write_rows` (the rows stay on disk).

    Args:
        directory: the folder.
        **options: the model's options, as :func:`~hbjax.counts.from_frame` takes them
            (``likelihood``, ``hierarchy``, ``intercept_prior``, ``centre``,
            ``clip_log_rate``, ...); default: its defaults.

    Raises:
        DataValidationError: the folder is not a complete rows folder.
    """
    from .saved import read_named_labels

    folder = Path(directory)
    if not is_rows_folder(folder):
        raise DataValidationError(
            f"{str(folder)!r} is not a prepared folder (no store.json); write one with "
            "`hbjax prepare FILE --out DIR` (hbjax.counts.prepare)."
        )
    store = json.loads((folder / "store.json").read_text())
    if store.get("format") != ROWS_FORMAT:
        raise DataValidationError(
            f"{str(folder)!r} was prepared in format {store.get('format')!r}; this hbjax reads "
            f"{ROWS_FORMAT!r}. Prepare it again with this version."
        )
    data_spec = CountSpec.from_json(store["spec"])
    fields, likelihood = checked_model_options(**options)
    spec = dataclasses.replace(data_spec, **fields)
    check_spec(spec)  # e.g. dispersion_by, a model option, must name a prepared level
    named = read_named_labels(folder / "labels", spec, store["labels"])

    def load(name: str) -> np.ndarray:
        return np.load(folder / f"{name}.npy", mmap_mode="r")

    columns = {
        "counts": load("counts"),
        "log_factorial": load("log_factorial"),
        "x": {s.name: load(f"x_{i}") for i, s in enumerate(spec.slopes)},
        "cells": {e.name: load(f"cells_{i}") for i, e in enumerate(spec.effects)},
    }
    if spec.offset is not None:
        columns["offset"] = load("offset")
    units = named["units"]
    rows = UnitRows(unit=load("unit"), weight=load("weight"), columns=columns, n_units=len(units))
    levels = {g: named["levels"][g] for g in spec.groups}
    unit_level = {g: np.load(folder / f"level_{i}.npy") for i, g in enumerate(spec.groups)}
    labels = _Labels(
        units=units,
        levels=levels,
        unit_level=unit_level,
        cells=named["cells"],
        periods=named["periods"],
        unit_rows=np.zeros(0, np.int64),
        mean={s.name: np.load(folder / f"mean_{i}.npy") for i, s in enumerate(spec.slopes)},
        standard={k: (float(m), float(sd)) for k, (m, sd) in store["covariates"].items()},
        constant={},
        span={},
        n_rows=int(store["n_rows"]),
        chunks=0,
        sales=True,
    )
    period = load("period") if spec.period is not None else None
    return _count_data(spec, labels, rows, period, likelihood)


__all__ = ["ROWS_FORMAT", "file_chunks", "is_rows_folder", "read_chunks", "read_rows", "write_rows"]
