"""Tables read as written (issue: nothing misread): labels, headers, encodings, zones."""

import warnings

import jax
import numpy as np
import pytest

import hbjax
from hbjax.cli import main
from hbjax.counts import elasticity_data, prepare


@pytest.fixture(scope="module")
def table():
    return hbjax.simulate(n_units=12, n_periods=6, n_groups=3, seed=4).frame.astype({"period": int})


def _relabel(frame, mapping):
    return frame.assign(product=frame["product"].map(mapping))


def test_labels_are_read_as_text_exactly_as_written(table, tmp_path):
    products = table["product"].unique()
    names = ["01", "1", "1E2", "None", "NA", "10000000000000000001", "10000000000000000002",
             "007", "7", "nan", "0x1F", "1.0"]  # fmt: skip
    frame = _relabel(table, dict(zip(products, names, strict=True)))
    frame["category"] = frame["category"].map({"C0": "NA", "C1": "null", "C2": "2"})
    path = tmp_path / "labels.csv"
    frame.to_csv(path, index=False)
    streamed = prepare(path, tmp_path / "rows", chunk_rows=17, progress=False)
    for data in (elasticity_data(path), streamed):
        assert sorted(data.units) == sorted(names)  # 12 products, not fewer
        assert sorted(data.levels["category"]) == ["2", "NA", "null"]
    # an empty label is still a missing one
    frame.loc[3, "product"] = ""
    frame.to_csv(path, index=False)
    with pytest.raises(hbjax.DataValidationError, match="missing labels"):
        elasticity_data(path)


def test_spaces_around_labels_are_an_error_when_they_split_a_product(table, tmp_path):
    path = tmp_path / "spaces.csv"
    split = table.copy()
    split.loc[split.index[::2], "product"] = split["product"] + " "
    split.to_csv(path, index=False)
    with pytest.raises(hbjax.DataValidationError, match="differ only by spaces"):
        elasticity_data(path)
    with pytest.raises(hbjax.DataValidationError, match="differ only by spaces"):
        prepare(path, tmp_path / "rows", progress=False)
    # two spaced spellings and no bare one: still one error naming both
    both = table.copy()
    both.loc[both.index[::2], "product"] = both["product"] + " "
    both.loc[both.index[1::2], "product"] = " " + both["product"]
    both.to_csv(path, index=False)
    with pytest.raises(hbjax.DataValidationError, match="differ only by spaces \\(' P00' and"):
        elasticity_data(path)
    lone = table.assign(product=table["product"].where(table["product"] != "P00", " P00"))
    lone.to_csv(path, index=False)
    with pytest.warns(hbjax.DataWarning, match="spaces around them"):
        data = elasticity_data(path)
    assert " P00" in data.units and len(data.units) == 12


@pytest.mark.parametrize(
    ("write", "words"),
    [
        (lambda f, p: f.to_csv(p, index=False, sep=";"), "separated by ';'"),
        (lambda f, p: f.to_csv(p, index=False, sep="\t"), "separated by '\\\\t'"),
        (lambda f, p: f.to_csv(p, index=False, encoding="utf-16"), "not UTF-8"),
        (
            lambda f, p: (
                f.assign(extra=f["price"])
                .set_axis([*f.columns, "price"], axis=1)
                .to_csv(p, index=False)
            ),
            "more than one column named 'price'",
        ),
        (
            lambda f, p: f.assign(
                period=[
                    f"2024-01-{d:02d}T00:00:00{'+00:00' if i % 2 else '+05:00'}"
                    for i, d in enumerate(f["period"] + 1)
                ]
            ).to_csv(p, index=False),
            "mixes time-zone offsets",
        ),
    ],
)
def test_tables_pandas_would_misread_are_refused_with_the_fix(table, tmp_path, write, words):
    path = tmp_path / "table.csv"
    write(table, path)
    with pytest.raises(hbjax.DataValidationError, match=words):
        elasticity_data(path)
    with pytest.raises(hbjax.DataValidationError, match=words):
        prepare(path, tmp_path / "rows", progress=False)


def test_a_table_without_sales_warns(table, tmp_path):
    with pytest.warns(hbjax.DataWarning, match="0 in every row"):
        elasticity_data(table.assign(units_sold=0))
    path = tmp_path / "nothing.csv"
    table.assign(units_sold=0).to_csv(path, index=False)
    with pytest.warns(hbjax.DataWarning, match="'units_sold' is 0 in every row"):
        prepare(path, tmp_path / "rows", chunk_rows=20, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        elasticity_data(table)  # the normal table: no such warning
    assert not [w for w in caught if "0 in every row" in str(w.message)]


def test_too_few_draws_for_an_interval_are_refused(table, tmp_path, capsys):
    path = tmp_path / "t.csv"
    table.to_csv(path, index=False)
    for command in (["fit", str(path)], ["predict", str(tmp_path), str(path)]):
        assert main([*command, "--samples", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "at least 20 draws" in err


def test_a_named_pipe_is_read_once(table, tmp_path):
    """``mkfifo`` + a writer (e.g. zcat into it): the header checks must not consume it."""
    import os
    import threading

    path = tmp_path / "pipe.csv"
    os.mkfifo(path)
    text = table.to_csv(index=False)
    writer = threading.Thread(target=path.write_text, args=(text,))
    writer.start()
    data = elasticity_data(path)
    writer.join(timeout=30)
    assert len(data.rows.unit) == len(table) and len(data.units) == table["product"].nunique()


def test_a_named_pipe_without_a_writer_is_refused_not_waited_on_for_ever(
    table, tmp_path, monkeypatch
):
    import os
    import time

    import hbjax.io.tables

    monkeypatch.setattr(hbjax.io.tables, "PIPE_WAIT_S", 0.3)
    path = tmp_path / "pipe.csv"
    os.mkfifo(path)
    start = time.monotonic()
    with pytest.raises(hbjax.DataValidationError, match="nothing writes into the named pipe"):
        elasticity_data(path)
    assert time.monotonic() - start < 10
    # prepare reads a table twice: a pipe is refused before anything is read
    with pytest.raises(hbjax.DataValidationError, match="the table is read twice"):
        prepare(path, tmp_path / "rows", progress=False)
    assert not (tmp_path / "rows").exists()


def _save(frame, path, how):
    """``frame`` written as people save tables (returns the path written)."""
    if how == "utf-8 BOM (Excel)":
        frame.to_csv(path, index=False, encoding="utf-8-sig")
    elif how == "gzip":
        path = path.with_name(path.name + ".gz")
        frame.to_csv(path, index=False, compression="gzip")
    elif how == "CRLF line ends":
        frame.to_csv(path, index=False, lineterminator="\r\n")
    elif how == "quoted fields":
        frame.to_csv(path, index=False, quoting=1)  # csv.QUOTE_ALL
    elif how == "Parquet categoricals":
        path = path.with_suffix(".parquet")
        frame.astype({"product": "category", "category": "category"}).to_parquet(path)
    return path


@pytest.mark.parametrize(
    "how", ["utf-8 BOM (Excel)", "gzip", "CRLF line ends", "quoted fields", "Parquet categoricals"]
)
@pytest.mark.parametrize("names", ["plain", "unicode"])
def test_tables_as_people_save_them_read_like_the_table_itself(table, tmp_path, how, names):
    if names == "unicode":  # emoji, accents, CJK, a comma inside a label
        labels = ["🍎 apple", "crème brûlée", "牛奶", "a, b", "Ω", "naïve", "🚀", "x" * 80,
                  "ß", "😀😀", "東京", "é"]  # fmt: skip
        table = _relabel(table, dict(zip(table["product"].unique(), labels, strict=True)))
        table = table.assign(category=table["category"].map({"C0": "👟", "C1": "Café", "C2": "C2"}))
    expected = elasticity_data(table)
    path = _save(table, tmp_path / "t.csv", how)
    read = elasticity_data(path)
    streamed = prepare(path, tmp_path / "rows", chunk_rows=25, progress=False)
    for data in (read, streamed):
        assert list(data.units) == list(expected.units)
        assert list(data.levels["category"]) == list(expected.levels["category"])
        for got, want in zip(
            jax.tree.leaves((data.rows, data.period)),
            jax.tree.leaves((expected.rows, expected.period)),
            strict=True,
        ):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("zone", [None, "Europe/Paris", "UTC"])
def test_dates_as_iso_text_or_in_one_time_zone_are_periods(table, tmp_path, zone):
    import pandas as pd

    dates = pd.Timestamp("2024-01-01") + pd.to_timedelta(7 * table["period"], "D")
    if zone is None:
        column = dates.dt.strftime("%Y-%m-%d")  # ISO text
    else:
        column = dates.dt.tz_localize(zone)
    path = tmp_path / "dated.csv"
    table.assign(period=column).to_csv(path, index=False)
    expected = elasticity_data(table)
    data = elasticity_data(path)
    assert len(data.periods) == table["period"].nunique()
    assert data.periods[0].strftime("%Y-%m-%d") == "2024-01-01"
    assert data.periods.is_monotonic_increasing
    np.testing.assert_array_equal(data.period, expected.period)


def test_prices_with_a_currency_sign_name_the_value(table, tmp_path):
    path = tmp_path / "dollars.csv"
    table.assign(price="$" + table["price"].round(2).astype(str)).to_csv(path, index=False)
    with pytest.raises(hbjax.DataValidationError, match=r"column 'price'.*'\$10\.58'"):
        elasticity_data(path)
