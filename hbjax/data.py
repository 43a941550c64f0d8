"""From a long-format table to a :class:`Panel` of arrays plus an :class:`Encoding` of labels.

This is the only module (with :mod:`hbjax.posterior` on the way back) that touches pandas.
Every check here raises :class:`DataValidationError` naming the column, the first offending
rows (by the frame's index) and the fix.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import select
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from jax.sharding import Mesh

from .panel import DensePanel as DensePanel
from .panel import Panel as Panel
from .parallel.blocks import _local_blocks, default_block_count, plan_blocks

#: Largest count that float32 represents exactly (2**24); the kernel works in float32.
MAX_COUNT = 2**24
_SHOW_ROWS = 5


class DataValidationError(ValueError):
    """A table cannot be turned into a panel; the message names the column, rows and fix."""


class DataWarning(UserWarning):
    """A table that can be fitted but has units or groups whose estimates rest on the prior."""


@dataclasses.dataclass(frozen=True)
class Encoding:
    """Host-side labels for the indices of a :class:`Panel`.

    Attributes:
        units: unit labels; ``units[i]`` is unit index ``i``.
        groups: group labels.
        periods: period labels (sorted).
        unit_group: group index of each unit.
        columns: the column names used, keyed by role
            (``unit, group, period, price, units``).
    """

    units: pd.Index
    groups: pd.Index
    periods: pd.Index
    unit_group: np.ndarray
    columns: Mapping[str, str]

    @property
    def unit_column(self) -> str:
        """Name of the unit column in the input (e.g. ``"product"``)."""
        return self.columns["unit"]

    @property
    def group_column(self) -> str:
        """Name of the group column in the input (e.g. ``"category"``)."""
        return self.columns["group"]

    def unit_frame(self) -> pd.DataFrame:
        """One row per unit: its label and its group's label, in index order."""
        return pd.DataFrame(
            {
                self.unit_column: self.units,
                self.group_column: self.groups[self.unit_group],
            }
        )


def _show(value: object) -> str:
    """``repr`` of a label or value as the user wrote it (NumPy scalars unwrapped)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _rows(frame: pd.DataFrame, mask: np.ndarray) -> str:
    """Describe the first offending rows of ``frame`` (by index label)."""
    labels = frame.index[np.asarray(mask)]
    shown = ", ".join(_show(x) for x in labels[:_SHOW_ROWS].tolist())
    more = f" and {len(labels) - _SHOW_ROWS} more" if len(labels) > _SHOW_ROWS else ""
    return f"{len(labels)} row(s), first at index {shown}{more}"


def _numeric(frame: pd.DataFrame, column: str) -> np.ndarray:
    """Column as float64, with a clear error for text that is not a number."""
    raw = frame[column]
    if pd.api.types.is_bool_dtype(raw):
        raise DataValidationError(f"column {column!r} holds booleans; it must hold numbers.")
    values = pd.to_numeric(raw, errors="coerce")
    bad = values.isna().to_numpy() & raw.notna().to_numpy()
    if bad.any():
        example = raw[bad].iloc[0]
        raise DataValidationError(
            f"column {column!r} holds text that is not a number ({_show(example)}) in "
            f"{_rows(frame, bad)}; clean or drop those rows."
        )
    return values.to_numpy(dtype=np.float64, na_value=np.nan)


def _period_values(frame: pd.DataFrame, column: str) -> pd.Series:
    """Periods as integers or datetimes; periods must be integers or dates."""
    raw = frame[column]
    if raw.isna().any():
        raise DataValidationError(
            f"column {column!r} has missing periods in {_rows(frame, raw.isna().to_numpy())}; "
            "every row needs a period."
        )
    if pd.api.types.is_datetime64_any_dtype(raw):
        return raw
    if pd.api.types.is_numeric_dtype(raw) and not pd.api.types.is_bool_dtype(raw):
        floats = raw.to_numpy(dtype=np.float64)
        bad = ~np.isfinite(floats) | (floats != np.round(floats))
        if bad.any():
            raise DataValidationError(
                f"column {column!r} must hold integer periods or dates; found "
                f"{_show(raw[bad].iloc[0])} in {_rows(frame, bad)}."
            )
        return raw.astype(np.int64)
    try:
        parsed = pd.to_datetime(raw.astype(str), format="ISO8601", errors="coerce")
    except ValueError:  # pandas refuses to mix time-zone offsets in one column
        raise DataValidationError(
            f"column {column!r} mixes time-zone offsets (e.g. {_show(raw.iloc[0])}); write "
            "every period in one zone, or without offsets (dates only)."
        ) from None
    bad = parsed.isna().to_numpy()
    if bad.any():
        raise DataValidationError(
            f"column {column!r} must hold integer periods or dates (e.g. 2024-01-31); found "
            f"{_show(raw[bad].iloc[0])} in {_rows(frame, bad)}."
        )
    return parsed


def _factorize(values: pd.Series) -> tuple[np.ndarray, pd.Index]:
    """Integer codes for labels, sorted where the labels can be ordered."""
    try:
        codes, labels = pd.factorize(values, sort=True)
    except TypeError:  # mixed label types cannot be sorted
        codes, labels = pd.factorize(values, sort=False)
    return codes.astype(np.int32), pd.Index(labels, name=values.name)


def _check_columns(frame: object, roles: Mapping[str, str]) -> None:
    """The table is a non-empty DataFrame with one distinct column per role."""
    if not isinstance(frame, pd.DataFrame):
        raise DataValidationError(
            f"expected a pandas DataFrame, got {type(frame).__name__}; "
            "use hbjax.read_table(path) for CSV or Parquet files."
        )
    seen: dict[str, str] = {}
    for role, name in roles.items():
        if name in seen:
            raise DataValidationError(
                f"column {name!r} is given for both {seen[name]}= and {role}=; "
                "each role needs its own column."
            )
        seen[name] = role
    if frame.columns.duplicated().any():
        dup = frame.columns[frame.columns.duplicated()][0]
        raise DataValidationError(f"the table has two columns named {dup!r}; rename one of them.")
    missing = [f"{role}={name!r}" for role, name in roles.items() if name not in frame.columns]
    if missing:
        raise DataValidationError(
            f"missing column(s) {', '.join(missing)}; the table has columns "
            f"{list(map(str, frame.columns))}. Pass the right names, e.g. "
            f"from_frame(df, {missing[0].split('=')[0]}='your_column')."
        )
    if len(frame) == 0:
        raise DataValidationError("the table is empty; it needs at least one row per unit.")
    for role in ("unit", "group"):
        column = roles[role]
        na = frame[column].isna().to_numpy()
        if na.any():
            raise DataValidationError(
                f"column {column!r} has missing labels in {_rows(frame, na)}; "
                "fill or drop those rows."
            )


def _check_values(frame: pd.DataFrame, price: str, units: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated prices and counts as float64."""
    price_values = _numeric(frame, price)
    bad = ~np.isfinite(price_values) | ~(price_values > 0)
    if bad.any():
        first = price_values[bad][0]
        raise DataValidationError(
            f"column {price!r} must be finite and > 0 (log price is used); found {_show(first)} in "
            f"{_rows(frame, bad)}. Drop those rows or fix the prices."
        )
    return price_values, check_counts(frame, units)


def check_counts(frame: pd.DataFrame, units: str) -> np.ndarray:
    """Column ``units`` as float64 counts: whole, finite, >= 0, exact in float32."""
    count_values = _numeric(frame, units)
    checks = [
        (np.isnan(count_values), "missing (NaN)", "drop those rows or fill them"),
        (np.isinf(count_values), "infinite", "drop or fix those rows"),
        (count_values < 0, "negative", "counts sold cannot be negative; fix or drop them"),
        (
            np.isfinite(count_values) & (count_values != np.round(count_values)),
            "not whole numbers",
            "a count model needs integer counts; round them or fix the column",
        ),
        (
            count_values > MAX_COUNT,
            f"above {MAX_COUNT} (not exact in float32)",
            "rescale the counts (e.g. thousands of units) before fitting",
        ),
    ]
    for mask, what, fix in checks:
        if mask.any():
            raise DataValidationError(
                f"column {units!r} has values that are {what} "
                f"({_show(count_values[mask][0])}) in {_rows(frame, mask)}; {fix}."
            )
    return count_values


def duplicate_pair_error(
    roles: Mapping[str, str], unit_label: object, period_label: object, where: str
) -> DataValidationError:
    """The error for a (unit, period) pair given more than once; ``where``: the rows."""
    unit, period = roles["unit"], roles["period"]
    return DataValidationError(
        f"({unit!r}, {period!r}) = ({_show(unit_label)}, {_show(period_label)}) appears more "
        f"than once: {where}. Aggregate them to one row per unit and period (e.g. "
        "df.groupby([unit, period]).agg(...))."
    )


def _codes(frame: pd.DataFrame, column: str, values: pd.Series, labels: pd.Index) -> np.ndarray:
    """Codes of ``values`` in a given ``labels`` index; every value must be known."""
    codes = labels.get_indexer(values)
    unknown = codes < 0
    if unknown.any():
        raise DataValidationError(
            f"column {column!r} has labels not in the encoding (e.g. "
            f"{_show(values[unknown].iloc[0])}) in {_rows(frame, unknown)}; encode every process's "
            "rows with the encoding built from the whole table."
        )
    return codes.astype(np.int32)


def _check_spaces(labels: pd.Index, column: str) -> None:
    """Labels with spaces around them: an error when that is all that tells two apart."""
    text = [label for label in labels if isinstance(label, str) and label != label.strip()]
    if not text:
        return
    stripped = pd.Index([x.strip() if isinstance(x, str) else x for x in labels])
    if stripped.has_duplicates:
        # two labels that strip to the same text ("P00 " and "P00", or "P00 " and " P00")
        first, second = labels[stripped == stripped[stripped.duplicated()][0]][:2]
        raise DataValidationError(
            f"column {column!r} has labels that differ only by spaces ({_show(first)} and "
            f"{_show(second)}): one product or two? Strip them, e.g. "
            f"df[{column!r}] = df[{column!r}].str.strip(), or rename one."
        )
    warnings.warn(
        f"column {column!r} has {len(text)} label(s) with spaces around them (e.g. "
        f"{_show(text[0])}); they are kept as written. Strip them if that is not meant.",
        DataWarning,
        stacklevel=4,
    )


def _encode(
    frame: pd.DataFrame, roles: Mapping[str, str], encoding: Encoding | None = None
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], Encoding]:
    """Unit and period codes of every row, the rows' order by (unit, period), the labels.

    Labels are reused when ``encoding`` is given. A (unit, period) pair given twice is
    found on the sorted keys (no hash table over the rows).
    """
    unit, group, period = roles["unit"], roles["group"], roles["period"]
    _check_columns(frame, {"unit": unit, "group": group, "period": period})
    periods = _period_values(frame, period)
    if encoding is None:
        unit_codes, unit_labels = _factorize(frame[unit])
        group_codes, group_labels = _factorize(frame[group])
        _check_spaces(unit_labels, unit)
        _check_spaces(group_labels, group)
        period_codes, period_labels = _factorize(periods)
        period_labels = period_labels.rename(period)
    else:
        unit_labels, group_labels = encoding.units, encoding.groups
        period_labels = encoding.periods
        unit_codes = _codes(frame, unit, frame[unit], unit_labels)
        group_codes = _codes(frame, group, frame[group], group_labels)
        period_codes = _codes(frame, period, periods, period_labels)

    n_units, n_periods = len(unit_labels), len(period_labels)
    unit_group = np.full(n_units, -1, dtype=np.int32)
    if encoding is not None:
        unit_group[:] = encoding.unit_group
    else:
        unit_group[unit_codes] = group_codes
    conflict = group_codes != unit_group[unit_codes]
    if conflict.any():
        bad_unit = unit_labels[unit_codes[conflict][0]]
        in_groups = sorted(map(str, frame.loc[frame[unit] == bad_unit, group].unique()))
        raise DataValidationError(
            f"unit {_show(bad_unit)} (column {unit!r}) appears in more than one group "
            f"(column {group!r}: {in_groups}) in {_rows(frame, conflict)}; "
            "each unit must belong to exactly one group."
        )

    key = unit_codes.astype(np.int64) * n_periods + period_codes
    order = np.argsort(key, kind="stable")  # rows by unit, then period
    sorted_key = key[order]
    if np.any(sorted_key[1:] == sorted_key[:-1]):  # the error path may take its time
        duplicated = pd.Series(key).duplicated(keep=False).to_numpy()
        first = np.flatnonzero(duplicated)[0]
        raise duplicate_pair_error(
            roles,
            unit_labels[unit_codes[first]],
            period_labels[period_codes[first]],
            f"{_rows(frame, duplicated)} are duplicates",
        )
    encoding = encoding or Encoding(
        units=unit_labels,
        groups=group_labels,
        periods=period_labels,
        unit_group=unit_group,
        columns=dict(roles),
    )
    return (unit_codes, period_codes, order), encoding


def from_frame(
    frame: pd.DataFrame,
    *,
    unit: str = "product",
    group: str = "category",
    period: str = "period",
    price: str = "price",
    units: str = "units_sold",
    encoding: Encoding | None = None,
) -> tuple[Panel, Encoding]:
    """Validate a long-format table and encode it as a :class:`Panel` plus :class:`Encoding`.

    One row per (unit, period): the unit's group, its price and the units sold. Other
    columns are ignored.

    Args:
        frame: the table.
        unit: column of unit (product) labels.
        group: column of group (category) labels; each unit belongs to exactly one group.
        period: column of periods (integers or dates).
        price: column of prices (> 0).
        units: column of counts sold (non-negative integers).
        encoding: labels to encode against (e.g. the whole table's, when ``frame`` is one
            process's slice of it); built from ``frame`` by default.

    Returns:
        ``(panel, encoding)``: host arrays sorted by unit and period, and the labels.

    Raises:
        DataValidationError: with the column, the first offending rows and the fix.

    Example:
        >>> import pandas as pd, hbjax
        >>> df = pd.DataFrame({"product": ["a", "a", "b", "b"], "category": ["x"] * 4,
        ...                    "period": [1, 2, 1, 2], "price": [2.0, 2.5, 3.0, 2.9],
        ...                    "units_sold": [10, 8, 4, 5]})
        >>> panel, encoding = hbjax.from_frame(df)
        >>> panel.n_units, panel.n_periods
        (2, 2)
    """
    roles = {"unit": unit, "group": group, "period": period, "price": price, "units": units}
    _check_columns(frame, roles)
    price_values, count_values = _check_values(frame, price, units)
    (unit_codes, period_codes, order), encoding = _encode(frame, roles, encoding)
    n_periods = len(encoding.periods)
    check_panel_shape(encoding, roles)
    warn_weak_units(constant_units(unit_codes, price_values, len(encoding.units)), encoding)
    if not np.any(count_values > 0):
        warn_no_sales(roles["units"])
    unit_group = encoding.unit_group
    panel = Panel(
        unit_idx=unit_codes[order],
        cell_idx=(unit_group[unit_codes] * n_periods + period_codes)[order].astype(np.int32),
        log_price=np.log(price_values[order]).astype(np.float32),
        counts=count_values[order].astype(np.float32),
        weight=np.ones(len(order), dtype=np.float32),
        unit_group=unit_group,
        unit_rows=np.bincount(unit_codes, minlength=len(encoding.units)).astype(np.int32),
        n_units=len(encoding.units),
        n_groups=len(encoding.groups),
        n_periods=n_periods,
    )
    return panel, encoding


def check_panel_shape(encoding: Encoding, roles: Mapping[str, str]) -> None:
    """At least two units and two periods: the model pools units and needs price changes."""
    if len(encoding.units) < 2:
        raise DataValidationError(
            f"the table has a single unit ({_show(encoding.units[0])} in column "
            f"{roles['unit']!r}); a hierarchical model pools several units: fit at least 2 "
            "(or a plain Poisson regression for one)."
        )
    if len(encoding.periods) < 2:
        raise DataValidationError(
            f"the table has a single period ({_show(encoding.periods[0])} in column "
            f"{roles['period']!r}); elasticities are identified from prices changing over "
            "time: give at least 2 periods."
        )


def _labels_of(labels: pd.Index, codes: np.ndarray) -> str:
    shown = ", ".join(_show(x) for x in labels[codes[:_SHOW_ROWS]].tolist())
    more = f" and {len(codes) - _SHOW_ROWS} more" if len(codes) > _SHOW_ROWS else ""
    return shown + more


def constant_units(unit_codes: np.ndarray, values: np.ndarray, n_units: int) -> np.ndarray:
    """Codes of the units whose ``values`` (one per row, rows in any order) never change."""
    low, high = np.full(n_units, np.inf), np.full(n_units, -np.inf)
    np.minimum.at(low, unit_codes, values)
    np.maximum.at(high, unit_codes, values)
    return np.flatnonzero(low == high)


def warn_no_sales(units: str) -> None:
    """Warn that the ``units`` column is 0 in every row (the priors alone decide)."""
    warnings.warn(
        f"column {units!r} is 0 in every row: with no sales the elasticities come from the "
        "priors alone. Check that it is the units sold.",
        DataWarning,
        stacklevel=3,
    )


def warn_weak_units(constant: np.ndarray, encoding: Encoding) -> None:
    """Warn (:class:`DataWarning`) about units whose price never changes and lone units."""
    warn_constant_units(constant, encoding.units, encoding.unit_column, "price", "elasticities")
    warn_lone_groups(encoding.unit_group, encoding.groups, encoding.group_column, "elasticity")


def warn_constant_units(
    constant: np.ndarray, units: pd.Index, unit: str, column: str, what: str
) -> None:
    """Warn that the units coded ``constant`` never change ``column``.

    Their ``what`` (their slopes of it) then come from their groups and the prior.
    """
    if len(constant):
        warnings.warn(
            f"{len(constant)} unit(s) never change {column} ({unit!r}: "
            f"{_labels_of(units, constant)}): their {what} come from their group and the "
            "prior, not from their own data.",
            DataWarning,
            stacklevel=4,
        )


def warn_lone_groups(unit_group: np.ndarray, groups: pd.Index, level: str, what: str) -> None:
    """Warn about groups of ``level`` with a single unit: their ``what`` rests on it."""
    lone = np.flatnonzero(np.bincount(unit_group, minlength=len(groups)) == 1)
    if len(lone):
        warnings.warn(
            f"{len(lone)} group(s) have a single unit ({level!r}: "
            f"{_labels_of(groups, lone)}): their group {what} rests on that unit and the "
            "prior.",
            DataWarning,
            stacklevel=4,
        )


def readable_kind(path: Path) -> str:
    """``"CSV"`` or ``"Parquet"`` for an existing file; a clear error otherwise."""
    kind = _reader(path)
    if not path.exists():
        raise DataValidationError(f"no such file: {str(path)!r}.")
    if path.is_dir():
        raise DataValidationError(f"{str(path)!r} is a folder; pass a .csv or .parquet file.")
    return kind


def _reader(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".csv", ".csv.gz", ".txt")):
        return "CSV"
    if name.endswith((".parquet", ".pq")):
        return "Parquet"
    raise DataValidationError(f"cannot read {str(path)!r}: expected a .csv or .parquet file.")


#: What pandas reads as missing in a CSV by default; label columns take only the empty
#: field (a product named ``NA`` or ``None`` is a product).
_CSV_MISSING = [
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
]  # fmt: skip


#: Seconds a named pipe may stay without a writer before reading it is refused.
PIPE_WAIT_S = 10.0


def _read_once(path: Path, wait: float | None = None) -> io.BytesIO:
    """A pipe's bytes (``mkfifo``: it can be read only once), decompressed for ``.gz``.

    A pipe that nothing writes into would block for ever; after ``wait`` seconds
    (:data:`PIPE_WAIT_S`) without a writer it is refused.
    """
    wait = PIPE_WAIT_S if wait is None else wait
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opens without waiting for a writer
    chunks: list[bytes] = []
    writer = False
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:  # a writer, no data yet
                writer = True
                select.select([fd], [], [], 1.0)
                continue
            if chunk:
                writer = True
                chunks.append(chunk)
            elif writer:  # end of the data
                break
            elif time.monotonic() > deadline:
                raise DataValidationError(
                    f"nothing writes into the named pipe {str(path)!r} (waited {wait:g} s); "
                    "start the program that writes it first, or pass the file itself."
                )
            else:  # no writer yet
                time.sleep(0.05)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    return io.BytesIO(gzip.decompress(data) if path.name.lower().endswith(".gz") else data)


def _rewound(source: Path | io.BytesIO) -> Path | io.BytesIO:
    """``source`` ready to be read from its start (a buffer is rewound)."""
    if isinstance(source, io.BytesIO):
        source.seek(0)
    return source


def _check_csv_header(path: Path, source: Path | io.BytesIO) -> None:
    """The header of a CSV as written: UTF-8, comma-separated, no column named twice.

    pandas would rename a second ``price`` to ``price.1`` and read a ``;``-separated file
    as one column; both are refused here with the fix.
    """
    try:
        first = pd.read_csv(
            _rewound(source), nrows=1, header=None, dtype=str, keep_default_na=False
        )
    except UnicodeDecodeError:
        raise DataValidationError(
            f"cannot read {str(path)!r}: it is not UTF-8 text (UTF-16 or a legacy encoding?); "
            "save it as UTF-8 CSV."
        ) from None
    except Exception:  # noqa: BLE001 - empty or unparsable: read_table says how
        return
    names = [str(x) for x in first.iloc[0]] if len(first) else []
    if len(names) == 1 and any(sep in names[0] for sep in (";", "\t", "|")):
        sep = next(sep for sep in (";", "\t", "|") if sep in names[0])
        raise DataValidationError(
            f"{str(path)!r} reads as one column named {names[0]!r}: it is separated by "
            f"{sep!r}, not commas. Save it with commas, or read it with "
            f"pandas.read_csv(path, sep={sep!r}) and pass the DataFrame to hbjax.from_frame."
        )
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise DataValidationError(
            f"{str(path)!r} has more than one column named {twice[0]!r}; rename or drop the "
            "extra one so that it is clear which to use."
        )


def csv_options(
    path: Path, labels: Sequence[str], source: io.BytesIO | None = None
) -> dict[str, object]:
    """``pd.read_csv`` options for a checked CSV: ``labels`` columns as text as written.

    First checks the header (:func:`_check_csv_header`: UTF-8, commas, no column twice).
    ``01`` stays ``01`` (not the number 1), ``1E2`` stays ``1E2``, 20-digit barcodes keep
    every digit, ``NA`` and ``None`` are labels; only an empty field is a missing label.
    Other columns keep pandas' usual parsing. ``source``: the bytes, when ``path`` is a
    pipe that can be read only once.
    """
    source = path if source is None else source
    _check_csv_header(path, source)
    if not labels:
        return {}
    header = pd.read_csv(_rewound(source), nrows=0).columns
    wanted = [c for c in dict.fromkeys(labels) if c in header]
    return {
        "dtype": dict.fromkeys(wanted, str),
        "keep_default_na": False,
        "na_values": {c: [""] if c in wanted else _CSV_MISSING for c in header},
    }


def read_table(
    path: str | os.PathLike[str],
    *,
    columns: Sequence[str] | None = None,
    only: tuple[str, Sequence[object]] | None = None,
    labels: Sequence[str] = (),
) -> pd.DataFrame:
    """Read a CSV (``.csv``, ``.csv.gz``) or Parquet (``.parquet``, ``.pq``) file.

    Args:
        path: the file.
        columns: read only these columns (all by default).
        only: ``(column, values)``: keep only rows whose ``column`` is in ``values``
            (Parquet reads just those rows; CSV is parsed whole, then filtered).
        labels: columns of labels, read from a CSV as text exactly as written
            (:func:`csv_options`; Parquet keeps its own types).

    Raises:
        DataValidationError: the path does not exist, cannot be read, or has another suffix.
    """
    path = Path(path)
    kind = readable_kind(path)
    try:
        if kind == "CSV":
            source = path if path.is_file() else _read_once(path)
            options = csv_options(path, labels, None if source is path else source)
            frame = pd.read_csv(
                _rewound(source), usecols=list(columns) if columns is not None else None, **options
            )
            if only is not None:
                frame = frame[frame[only[0]].isin(list(only[1]))]
            return frame
        filters = None if only is None else [(only[0], "in", list(only[1]))]
        return pd.read_parquet(
            path, columns=list(columns) if columns is not None else None, filters=filters
        )
    except PermissionError:
        raise DataValidationError(f"cannot read {str(path)!r}: permission denied.") from None
    except DataValidationError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser failure is a user-facing bad file
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if columns is not None and isinstance(exc, ValueError | KeyError) and kind == "CSV":
            message += f" (looked for columns {list(columns)})"
        raise DataValidationError(f"cannot read {str(path)!r} as {kind}: {message}") from None


def from_file(path: str | os.PathLike[str], **columns: str) -> tuple[Panel, Encoding]:
    """Read a CSV/Parquet file and encode it (column names as in :func:`from_frame`).

    For one process of a multi-host run, see :func:`read_process_panel`.
    """
    labels = label_columns(column_roles(columns))
    return from_frame(read_table(path, labels=labels), **columns)


def encode_rows(frame: pd.DataFrame, roles: Mapping[str, str]) -> tuple[np.ndarray, Encoding]:
    """Unit code of every row and the :class:`Encoding` of the label columns alone.

    ``roles`` maps ``unit, group, period`` (and optionally ``price, units``) to column
    names. The encoding depends only on the set of labels, so processes that each read the
    label columns of the whole table build the same one.
    """
    full = column_roles(roles)
    label_roles = {role: full[role] for role in ("unit", "group", "period")}
    (unit_codes, _, _), encoding = _encode(frame, label_roles)
    return unit_codes, dataclasses.replace(encoding, columns=full)


def write_labels(labels: pd.Index, folder: Path, name: str) -> str:
    """Write ``labels`` to ``folder/name.parquet`` (or ``.json``); return which.

    Labels of one type keep it (strings, integers, dates); a column mixing types (e.g.
    ``"a"`` and ``3``) is written as JSON instead, which keeps strings and numbers apart.
    A MultiIndex keeps its levels and names.
    """
    import json

    import pyarrow as pa

    frame = labels.to_frame(index=False) if isinstance(labels, pd.MultiIndex) else None
    try:
        table = frame if frame is not None else pd.DataFrame({"label": labels})
        table.to_parquet(folder / f"{name}.parquet", index=False)
        return "parquet"
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        (folder / f"{name}.parquet").unlink(missing_ok=True)

        def plain(x: object) -> object:
            if isinstance(x, tuple):
                return [plain(v) for v in x]
            return x.item() if isinstance(x, np.generic) else x

        names = list(labels.names) if frame is not None else None
        values = {"names": names, "values": [plain(x) for x in labels]}
        (folder / f"{name}.json").write_text(json.dumps(values))
        return "json"


def read_labels(folder: Path, name: str, kind: str, column: str | None = None) -> pd.Index:
    """The labels :func:`write_labels` wrote (``kind``: what it returned), named ``column``."""
    import json

    if kind == "parquet":
        frame = pd.read_parquet(folder / f"{name}.parquet")
        if list(frame.columns) != ["label"]:
            return pd.MultiIndex.from_frame(frame)
        return pd.Index(frame["label"], name=column)
    stored = json.loads((folder / f"{name}.json").read_text())
    if isinstance(stored, list):  # encodings written before MultiIndex support
        stored = {"names": None, "values": stored}
    if stored["names"] is not None:
        return pd.MultiIndex.from_tuples(
            [tuple(v) for v in stored["values"]], names=stored["names"]
        )
    return pd.Index(pd.Series(stored["values"], dtype=object), name=column)


def read_process_panel(
    path: str | os.PathLike[str], mesh: Mesh, **columns: str
) -> tuple[Panel, Encoding]:
    """This process's part of a panel in a file, for a multi-host run.

    Every process reads the label columns of the whole file and builds the same
    :class:`~hbjax.Encoding` and block plan; it then reads and validates only the rows of
    the units in its own devices' blocks (Parquet reads just those rows; CSV is parsed
    whole and filtered). Pass the result to :func:`hbjax.shard_panel` with the same mesh.

    Args:
        path: a CSV or Parquet file.
        mesh: the global mesh (:func:`hbjax.make_mesh`).
        **columns: column names, as in :func:`hbjax.from_frame`.
    """
    roles = column_roles(columns)
    keys = [roles["unit"], roles["group"], roles["period"]]
    text = label_columns(roles)  # as written: 01 is not 1
    labels = read_table(path, columns=list(dict.fromkeys(keys)), labels=text)
    unit_codes, encoding = encode_rows(labels, roles)
    unit_rows = np.bincount(unit_codes, minlength=len(encoding.units)).astype(np.int32)
    n_cells = len(encoding.groups) * len(encoding.periods)
    n_blocks = default_block_count(len(encoding.units), n_cells, mesh.devices.size)
    units = plan_blocks(unit_rows, n_blocks)
    local = _local_blocks(mesh, n_blocks)
    first, last = units[local[0]], units[local[-1] + 1]
    own = read_table(
        path, only=(encoding.unit_column, encoding.units[first:last].tolist()), labels=text
    )
    panel, _ = from_frame(own, **encoding.columns, encoding=encoding)
    return dataclasses.replace(panel, unit_rows=unit_rows, n_blocks=n_blocks), encoding


def save_encoding(encoding: Encoding, directory: str | os.PathLike[str]) -> None:
    """Write an :class:`Encoding` to ``directory`` (labels as :func:`write_labels`)."""
    import json

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    formats = {
        name: write_labels(getattr(encoding, name), folder, name)
        for name in ("units", "groups", "periods")
    }
    np.save(folder / "unit_group.npy", np.asarray(encoding.unit_group, np.int32))
    meta = {"columns": dict(encoding.columns), "formats": formats}
    (folder / "encoding.json").write_text(json.dumps(meta, indent=2))


def load_encoding(directory: str | os.PathLike[str]) -> Encoding:
    """Read an :class:`Encoding` written by :func:`save_encoding`."""
    import json

    folder = Path(directory)
    if not (folder / "encoding.json").is_file():
        raise DataValidationError(f"no encoding in {str(folder)!r} (encoding.json is missing).")
    meta = json.loads((folder / "encoding.json").read_text())
    roles = column_roles(meta["columns"])
    names = {"units": roles["unit"], "groups": roles["group"], "periods": roles["period"]}
    labels = {
        name: read_labels(folder, name, meta["formats"][name], column)
        for name, column in names.items()
    }
    return Encoding(
        units=labels["units"],
        groups=labels["groups"],
        periods=labels["periods"],
        unit_group=np.load(folder / "unit_group.npy"),
        columns=roles,
    )


def label_columns(roles: Mapping[str, str]) -> tuple[str, str]:
    """The columns of labels (unit, group) among the roles: read as text as written."""
    return roles["unit"], roles["group"]


def column_roles(columns: Mapping[str, str]) -> dict[str, str]:
    """Column names by role (``unit, group, period, price, units``), with defaults."""
    roles = {
        "unit": "product",
        "group": "category",
        "period": "period",
        "price": "price",
        "units": "units_sold",
    }
    roles.update(columns)
    return roles
