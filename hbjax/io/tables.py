"""Reading tables as written and checking their values: the pieces every reader shares.

Files (CSV read with label columns as text, Parquet, gzip, named pipes), the checks of
counts, numbers and periods, labels saved with their types, and the warnings about what a
table says little of. Every check raises :class:`DataValidationError` naming the column,
the first offending rows (by the frame's index) and the fix; :mod:`hbjax.counts.reader`
turns a table into count data with them.
"""

from __future__ import annotations

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

#: Largest count that float32 represents exactly (2**24); the kernel works in float32.
MAX_COUNT = 2**24
_SHOW_ROWS = 5


class DataValidationError(ValueError):
    """A table cannot be turned into a panel; the message names the column, rows and fix."""


class DataWarning(UserWarning):
    """A table that can be fitted but has units or groups whose estimates rest on the prior."""


def shown(value: object) -> str:
    """``repr`` of a label or value as the user wrote it (NumPy scalars unwrapped)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def which_rows(frame: pd.DataFrame, mask: np.ndarray) -> str:
    """Describe the first offending rows of ``frame`` (by index label)."""
    labels = frame.index[np.asarray(mask)]
    first = ", ".join(shown(x) for x in labels[:_SHOW_ROWS].tolist())
    more = f" and {len(labels) - _SHOW_ROWS} more" if len(labels) > _SHOW_ROWS else ""
    return f"{len(labels)} row(s), first at index {first}{more}"


def numeric_column(frame: pd.DataFrame, column: str) -> np.ndarray:
    """Column as float64, with a clear error for text that is not a number."""
    raw = frame[column]
    if pd.api.types.is_bool_dtype(raw):
        raise DataValidationError(f"column {column!r} holds booleans; it must hold numbers.")
    values = pd.to_numeric(raw, errors="coerce")
    bad = values.isna().to_numpy() & raw.notna().to_numpy()
    if bad.any():
        example = raw[bad].iloc[0]
        raise DataValidationError(
            f"column {column!r} holds text that is not a number ({shown(example)}) in "
            f"{which_rows(frame, bad)}; clean or drop those rows."
        )
    return values.to_numpy(dtype=np.float64, na_value=np.nan)


def period_values(frame: pd.DataFrame, column: str) -> pd.Series:
    """Periods as integers or datetimes; periods must be integers or dates."""
    raw = frame[column]
    if raw.isna().any():
        raise DataValidationError(
            f"column {column!r} has missing periods in {which_rows(frame, raw.isna().to_numpy())}; "
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
                f"{shown(raw[bad].iloc[0])} in {which_rows(frame, bad)}."
            )
        return raw.astype(np.int64)
    try:
        parsed = pd.to_datetime(raw.astype(str), format="ISO8601", errors="coerce")
    except ValueError:  # pandas refuses to mix time-zone offsets in one column
        raise DataValidationError(
            f"column {column!r} mixes time-zone offsets (e.g. {shown(raw.iloc[0])}); write "
            "every period in one zone, or without offsets (dates only)."
        ) from None
    bad = parsed.isna().to_numpy()
    if bad.any():
        raise DataValidationError(
            f"column {column!r} must hold integer periods or dates (e.g. 2024-01-31); found "
            f"{shown(raw[bad].iloc[0])} in {which_rows(frame, bad)}."
        )
    return parsed


def factorize(values: pd.Series) -> tuple[np.ndarray, pd.Index]:
    """Integer codes for labels, sorted where the labels can be ordered."""
    try:
        codes, labels = pd.factorize(values, sort=True)
    except TypeError:  # mixed label types cannot be sorted
        codes, labels = pd.factorize(values, sort=False)
    return codes.astype(np.int32), pd.Index(labels, name=values.name)


def check_counts(frame: pd.DataFrame, units: str) -> np.ndarray:
    """Column ``units`` as float64 counts: whole, finite, >= 0, exact in float32."""
    count_values = numeric_column(frame, units)
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
                f"({shown(count_values[mask][0])}) in {which_rows(frame, mask)}; {fix}."
            )
    return count_values


def duplicate_pair_error(
    roles: Mapping[str, str], unit_label: object, period_label: object, where: str
) -> DataValidationError:
    """The error for a (unit, period) pair given more than once; ``where``: the rows."""
    unit, period = roles["unit"], roles["period"]
    return DataValidationError(
        f"({unit!r}, {period!r}) = ({shown(unit_label)}, {shown(period_label)}) appears more "
        f"than once: {where}. Aggregate them to one row per unit and period (e.g. "
        "df.groupby([unit, period]).agg(...))."
    )


def check_spaces(labels: pd.Index, column: str) -> None:
    """Labels with spaces around them: an error when that is all that tells two apart."""
    text = [label for label in labels if isinstance(label, str) and label != label.strip()]
    if not text:
        return
    stripped = pd.Index([x.strip() if isinstance(x, str) else x for x in labels])
    if stripped.has_duplicates:
        # two labels that strip to the same text ("P00 " and "P00", or "P00 " and " P00")
        first, second = labels[stripped == stripped[stripped.duplicated()][0]][:2]
        raise DataValidationError(
            f"column {column!r} has labels that differ only by spaces ({shown(first)} and "
            f"{shown(second)}): one product or two? Strip them, e.g. "
            f"df[{column!r}] = df[{column!r}].str.strip(), or rename one."
        )
    warnings.warn(
        f"column {column!r} has {len(text)} label(s) with spaces around them (e.g. "
        f"{shown(text[0])}); they are kept as written. Strip them if that is not meant.",
        DataWarning,
        stacklevel=4,
    )


def _labels_of(labels: pd.Index, codes: np.ndarray) -> str:
    first = ", ".join(shown(x) for x in labels[codes[:_SHOW_ROWS]].tolist())
    more = f" and {len(codes) - _SHOW_ROWS} more" if len(codes) > _SHOW_ROWS else ""
    return first + more


def warn_no_sales(units: str) -> None:
    """Warn that the ``units`` column is 0 in every row (the priors alone decide)."""
    warnings.warn(
        f"column {units!r} is 0 in every row: with no sales the elasticities come from the "
        "priors alone. Check that it is the units sold.",
        DataWarning,
        stacklevel=3,
    )


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
    kind = reader_kind(path)
    if not path.exists():
        raise DataValidationError(f"no such file: {str(path)!r}.")
    if path.is_dir():
        raise DataValidationError(f"{str(path)!r} is a folder; pass a .csv or .parquet file.")
    return kind


def reader_kind(path: Path) -> str:
    """``"CSV"`` or ``"Parquet"`` by the file's suffix; another suffix is refused, named."""
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
            f"pandas.read_csv(path, sep={sep!r}) and pass the DataFrame to hbjax.counts.from_frame."
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


__all__ = [
    "DataValidationError",
    "DataWarning",
    "MAX_COUNT",
    "PIPE_WAIT_S",
    "check_counts",
    "check_spaces",
    "csv_options",
    "duplicate_pair_error",
    "factorize",
    "numeric_column",
    "period_values",
    "read_labels",
    "read_table",
    "readable_kind",
    "reader_kind",
    "shown",
    "warn_constant_units",
    "warn_lone_groups",
    "warn_no_sales",
    "which_rows",
    "write_labels",
]
