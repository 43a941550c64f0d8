"""A table too large for memory, streamed into a memory-mapped grid for minibatch fits.

:func:`hbjax.from_frame` holds the whole table in pandas (about 100 bytes per row while
it validates). :func:`write_grid` reads a CSV or Parquet file in chunks of rows, twice,
and never holds more than one chunk plus per-unit arrays:

1. validate every chunk (the same checks, messages and warnings as
   :func:`hbjax.from_frame`, rows named by their 0-based position in the file) and
   collect the labels;
2. scatter each chunk into ``[unit, period]`` grids on disk (``.npy`` files written
   through memory maps: 9 bytes per cell) and add up the per-unit sums the model needs.

The folder is what :meth:`hbjax.minibatch.UnitSampler.load` reads, plus the labels and the
per-unit sums; :func:`read_grid` opens it. The encoding (labels sorted, codes) is the one
:func:`hbjax.from_frame` builds from the same table, so results line up with a
full-batch fit. ``hbjax prepare FILE --out DIR`` then ``hbjax fit DIR --batch-size B``
does the same from the command line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from jax.scipy.special import gammaln
from jax.sharding import Mesh
from tqdm.auto import tqdm

from .data import (
    DataValidationError,
    Encoding,
    _check_columns,
    _check_spaces,
    _check_values,
    _factorize,
    _period_values,
    _reader,
    _rows,
    _show,
    check_panel_shape,
    column_roles,
    csv_options,
    duplicate_pair_error,
    label_columns,
    load_encoding,
    readable_kind,
    save_encoding,
    warn_no_sales,
    warn_weak_units,
)
from .minibatch import UnitSampler, UnitStats
from .outputs import AtomicFolder
from .sharding import default_block_count, plan_blocks

#: Format marker of a grid folder (``store.json``).
STORE_FORMAT = "hbjax-grid-2"
_COMPACT_EVERY = 16  # chunks between de-duplications of the collected label pairs


@dataclasses.dataclass(frozen=True)
class GridStore:
    """A grid folder written by :func:`write_grid`, opened by :func:`read_grid`.

    Attributes:
        directory: the folder.
        stats: the per-unit sums the model's centring and start need.
        encoding: the labels, as :func:`hbjax.from_frame` would build them.
        n_obs: observed (unit, period) rows.
    """

    directory: Path
    stats: UnitStats
    encoding: Encoding
    n_obs: int

    def sampler(self, batch_size: int, *, mesh: Mesh | None = None, seed: int = 0) -> UnitSampler:
        """A :class:`~hbjax.minibatch.UnitSampler` over the memory-mapped grid."""
        return UnitSampler.load(self.directory, batch_size, mesh=mesh, seed=seed)


def is_grid(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder written by :func:`write_grid`."""
    return (Path(path) / "store.json").is_file()


def _chunks(path: Path, roles: Mapping[str, str], chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The role columns of the file's rows in chunks, indexed by their position in the file.

    Labels are read from a CSV as text exactly as written (:func:`csv_options`).
    """
    kind = readable_kind(path)
    columns = list(dict.fromkeys(roles.values()))
    offset = 0
    try:
        if kind == "CSV":
            options = csv_options(path, label_columns(roles))
            chunks: Iterator[pd.DataFrame] = pd.read_csv(
                path, usecols=columns, chunksize=chunk_rows, **options
            )
        else:
            import pyarrow.parquet as pq

            # pre_buffer=False: with pyarrow's default the reader keeps ~3 MB per batch read
            # (4 GB over a billion rows); without it memory stays flat.
            reader = pq.ParquetFile(path, pre_buffer=False)
            batches = reader.iter_batches(batch_size=chunk_rows, columns=columns)
            chunks = (batch.to_pandas() for batch in batches)
        for chunk in chunks:
            chunk.index = pd.RangeIndex(offset, offset + len(chunk))
            offset += len(chunk)
            yield chunk
    except PermissionError:
        raise DataValidationError(f"cannot read {str(path)!r}: permission denied.") from None
    except DataValidationError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser failure is a user-facing bad file
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise DataValidationError(
            f"cannot read {str(path)!r} as {kind} (looked for columns {columns}): {message}"
        ) from None


def _row_count(path: Path) -> int | None:
    if _reader(path) != "Parquet" or not path.is_file():
        return None
    try:
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # noqa: BLE001 - the reading pass reports a bad file properly
        return None


def _labels(
    path: Path, roles: Mapping[str, str], chunk_rows: int, bar: tqdm
) -> tuple[Encoding, int]:
    """Pass 1: validate every chunk and build the encoding from the labels."""
    unit, group, period = roles["unit"], roles["group"], roles["period"]
    pairs: list[pd.DataFrame] = []
    periods: list[pd.Series] = []
    period_kind = None
    n_rows = 0
    sales = False
    for i, chunk in enumerate(_chunks(path, roles, chunk_rows)):
        _check_columns(chunk, roles)
        _, counts = _check_values(chunk, roles["price"], roles["units"])
        sales = sales or bool(np.any(counts > 0))
        values = _period_values(chunk, period)
        kind = "dates" if pd.api.types.is_datetime64_any_dtype(values) else "integers"
        if period_kind not in (None, kind):
            raise DataValidationError(
                f"column {period!r} holds {period_kind} in earlier rows and {kind} from row "
                f"{chunk.index[0]}; use one kind of period throughout."
            )
        period_kind = kind
        periods.append(pd.Series(pd.unique(values)))
        pairs.append(chunk[[unit, group]].drop_duplicates())
        if (i + 1) % _COMPACT_EVERY == 0:
            pairs = [pd.concat(pairs).drop_duplicates()]
            periods = [pd.Series(pd.unique(pd.concat(periods)))]
        n_rows += len(chunk)
        bar.update(len(chunk))
    if n_rows == 0:
        raise DataValidationError("the table is empty; it needs at least one row per unit.")
    if not sales:
        warn_no_sales(roles["units"])
    table = pd.concat(pairs).drop_duplicates()
    in_two = table[unit].duplicated(keep=False).to_numpy()
    if in_two.any():
        bad = table[unit].to_numpy()[in_two][0]
        groups = sorted(map(str, table.loc[table[unit] == bad, group]))
        raise DataValidationError(
            f"unit {_show(bad)} (column {unit!r}) appears in more than one group "
            f"(column {group!r}: {groups}); each unit must belong to exactly one group."
        )
    unit_codes, unit_labels = _factorize(table[unit].reset_index(drop=True))
    group_codes, group_labels = _factorize(table[group].reset_index(drop=True))
    _check_spaces(unit_labels, unit)
    _check_spaces(group_labels, group)
    unit_group = np.empty(len(unit_labels), np.int32)
    unit_group[unit_codes] = group_codes
    _, period_labels = _factorize(pd.concat(periods).drop_duplicates().reset_index(drop=True))
    encoding = Encoding(
        units=unit_labels,
        groups=group_labels,
        periods=period_labels.rename(period),
        unit_group=unit_group,
        columns=dict(roles),
    )
    return encoding, n_rows


def write_grid(
    path: str | os.PathLike[str],
    directory: str | os.PathLike[str],
    *,
    chunk_rows: int = 1_000_000,
    progress: bool = True,
    **columns: str,
) -> GridStore:
    """Stream a CSV/Parquet file into a memory-mapped grid folder for minibatch fits.

    Memory: one chunk of rows plus about 80 bytes per unit (labels and per-unit sums);
    disk: 9 bytes per (unit, period) cell.

    Args:
        path: a ``.csv`` (``.csv.gz``) or ``.parquet`` file, one row per (unit, period).
        directory: the folder to write: new, empty, or an earlier grid folder, which is
            replaced only once the new grid is complete.
        chunk_rows: rows read at once.
        progress: show a progress bar over the two passes.
        **columns: column names, as in :func:`hbjax.from_frame`.

    Returns:
        The written folder, opened (:func:`read_grid`).

    Raises:
        DataValidationError: as :func:`hbjax.from_frame`, with rows named by their 0-based
            position in the file.
        hbjax.outputs.OutputError: ``directory`` holds other files, or cannot be written.

    Example:
        >>> store = hbjax.stream.write_grid("sales.parquet", "sales-grid")  # doctest: +SKIP
        >>> sampler = store.sampler(batch_size=4096)  # doctest: +SKIP
        >>> model = hbjax.ElasticityModel.from_panel(store.stats)  # doctest: +SKIP
    """
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int; got {chunk_rows!r}.")
    path, directory = Path(path), Path(directory)
    roles = column_roles(columns)
    if readable_kind(path) and not path.is_file():
        raise DataValidationError(
            f"{str(path)!r} is not a regular file (a named pipe?): prepare reads the table "
            "twice, a pipe only once. Write it to a file first."
        )
    total = _row_count(path)
    # written into a staging folder, renamed into place once complete: a failure at any
    # point leaves an earlier grid in the folder as it was
    with (
        AtomicFolder(directory, owns=("store.json",), what="the grid folder") as staging,
        tqdm(
            total=None if total is None else 2 * total,
            desc="reading (pass 1 of 2: labels, checks)",
            unit="row",
            unit_scale=True,
            disable=not progress,
        ) as bar,
    ):
        encoding, n_rows = _labels(path, roles, chunk_rows, bar)
        check_panel_shape(encoding, roles)
        bar.set_description("writing (pass 2 of 2: grid)")
        sums = _write_cells(path, staging, roles, encoding, chunk_rows, bar)
        _write_meta(staging, encoding, sums, n_rows, str(path))
    warn_weak_units(np.flatnonzero(sums["price_low"] == sums["price_high"]), encoding)
    return read_grid(directory)


def _write_cells(
    path: Path,
    directory: Path,
    roles: Mapping[str, str],
    encoding: Encoding,
    chunk_rows: int,
    bar: tqdm,
) -> dict[str, np.ndarray]:
    """Pass 2: each chunk's cells into the grids; the per-unit sums."""
    n_units, n_periods = len(encoding.units), len(encoding.periods)
    shape = (n_units, n_periods)
    grids = {
        name: np.lib.format.open_memmap(directory / f"{name}.npy", "w+", dtype, shape)
        for name, dtype in (("log_price", np.float32), ("counts", np.float32), ("observed", bool))
    }
    unit_rows = np.zeros(n_units, np.int64)
    log_factorial = np.zeros(n_units, np.float64)
    moments = np.zeros((5, n_units), np.float64)
    price_low, price_high = np.full(n_units, np.inf), np.full(n_units, -np.inf)
    unit, period = roles["unit"], roles["period"]
    for chunk in _chunks(path, roles, chunk_rows):
        price, counts = _check_values(chunk, roles["price"], roles["units"])
        u = encoding.units.get_indexer(chunk[unit])
        p = encoding.periods.get_indexer(_period_values(chunk, period))
        key = pd.Series(u.astype(np.int64) * n_periods + p)
        twice = key.duplicated(keep=False).to_numpy() | grids["observed"][u, p]
        if twice.any():
            first = np.flatnonzero(twice)[0]
            raise duplicate_pair_error(
                roles,
                encoding.units[u[first]],
                encoding.periods[p[first]],
                f"{_rows(chunk, twice)} of this chunk, or earlier in the file",
            )
        log_price = np.log(price)
        grids["log_price"][u, p] = log_price
        grids["counts"][u, p] = counts
        grids["observed"][u, p] = True
        unit_rows += np.bincount(u, minlength=n_units)
        np.minimum.at(price_low, u, price)
        np.maximum.at(price_high, u, price)
        log_fact = np.asarray(gammaln(counts + 1.0), np.float64)
        log_factorial += np.bincount(u, log_fact, n_units)
        w = counts + 0.5
        log_w = np.log(w)
        terms = (w, w * log_price, w * log_price**2, w * log_w, w * log_price * log_w)
        for row, term in zip(moments, terms, strict=True):
            row += np.bincount(u, term, n_units)
        bar.update(len(chunk))
    for grid in grids.values():
        grid.flush()
    return {
        "unit_rows": unit_rows,
        "log_factorial": log_factorial,
        "moments": moments,
        "price_low": price_low,
        "price_high": price_high,
    }


def _write_meta(
    directory: Path, encoding: Encoding, sums: Mapping[str, np.ndarray], n_rows: int, source: str
) -> None:
    """The block plan, per-unit sums, labels and ``store.json`` (written last)."""
    n_units, n_groups, n_periods = (
        len(encoding.units),
        len(encoding.groups),
        len(encoding.periods),
    )
    n_blocks = default_block_count(n_units, n_groups * n_periods, 1)
    np.save(directory / "units.npy", plan_blocks(sums["unit_rows"], n_blocks))
    np.save(directory / "log_factorial.npy", sums["log_factorial"].astype(np.float32))
    np.save(directory / "moments.npy", sums["moments"].astype(np.float32))
    np.save(directory / "unit_rows.npy", sums["unit_rows"].astype(np.int32))
    save_encoding(encoding, directory)  # also unit_group.npy, which UnitSampler.load reads
    sampler = {
        "n_units": n_units,
        "n_groups": n_groups,
        "n_periods": n_periods,
        "first_unit": 0,
        "grid_units": n_units,
    }
    (directory / "sampler.json").write_text(json.dumps(sampler))
    store = {"format": STORE_FORMAT, "columns": dict(encoding.columns), "n_obs": n_rows}
    (directory / "store.json").write_text(json.dumps({**store, "source": source}, indent=2))


def read_grid(directory: str | os.PathLike[str]) -> GridStore:
    """Open a folder written by :func:`write_grid` (the grids stay on disk).

    Raises:
        DataValidationError: the folder is not a complete grid folder.
    """
    directory = Path(directory)
    if not is_grid(directory):
        raise DataValidationError(
            f"{str(directory)!r} is not a grid folder (no store.json); write one with "
            "hbjax.stream.write_grid or `hbjax prepare FILE --out DIR`."
        )
    meta = json.loads((directory / "store.json").read_text())
    if meta.get("format") != STORE_FORMAT:
        raise DataValidationError(
            f"{str(directory)!r} has grid format {meta.get('format')!r}; this hbjax reads "
            f"{STORE_FORMAT!r}. Write it again with this version."
        )
    encoding = load_encoding(directory)
    unit_group = encoding.unit_group
    stats = UnitStats(
        np.load(directory / "moments.npy"),
        unit_group,
        len(encoding.units),
        len(encoding.groups),
        len(encoding.periods),
    )
    return GridStore(directory, stats, encoding, int(meta["n_obs"]))


__all__ = ["GridStore", "is_grid", "read_grid", "write_grid"]
