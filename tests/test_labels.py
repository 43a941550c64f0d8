"""Tables read as written (issue: nothing misread): labels, headers, encodings, zones."""

import warnings

import pytest

import hbjax
from hbjax.cli import main


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
    grid = hbjax.write_grid(path, tmp_path / "grid", chunk_rows=17, progress=False)
    for encoding in (hbjax.from_file(path)[1], grid.encoding):
        assert sorted(encoding.units) == sorted(names)  # 12 products, not fewer
        assert sorted(encoding.groups) == ["2", "NA", "null"]
    # an empty label is still a missing one
    frame.loc[3, "product"] = ""
    frame.to_csv(path, index=False)
    with pytest.raises(hbjax.DataValidationError, match="missing labels"):
        hbjax.from_file(path)


def test_spaces_around_labels_are_an_error_when_they_split_a_product(table, tmp_path):
    path = tmp_path / "spaces.csv"
    split = table.copy()
    split.loc[split.index[::2], "product"] = split["product"] + " "
    split.to_csv(path, index=False)
    with pytest.raises(hbjax.DataValidationError, match="differ only by spaces"):
        hbjax.from_file(path)
    with pytest.raises(hbjax.DataValidationError, match="differ only by spaces"):
        hbjax.write_grid(path, tmp_path / "grid", progress=False)
    # two spaced spellings and no bare one: still one error naming both
    both = table.copy()
    both.loc[both.index[::2], "product"] = both["product"] + " "
    both.loc[both.index[1::2], "product"] = " " + both["product"]
    both.to_csv(path, index=False)
    with pytest.raises(hbjax.DataValidationError, match="differ only by spaces \\(' P00' and"):
        hbjax.from_file(path)
    lone = table.assign(product=table["product"].where(table["product"] != "P00", " P00"))
    lone.to_csv(path, index=False)
    with pytest.warns(hbjax.DataWarning, match="spaces around them"):
        _, encoding = hbjax.from_file(path)
    assert " P00" in encoding.units and len(encoding.units) == 12


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
        hbjax.from_file(path)
    with pytest.raises(hbjax.DataValidationError, match=words):
        hbjax.write_grid(path, tmp_path / "grid", progress=False)


def test_a_table_without_sales_warns(table):
    with pytest.warns(hbjax.DataWarning, match="0 in every row"):
        hbjax.from_frame(table.assign(units_sold=0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hbjax.from_frame(table)  # the normal table: no such warning
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
    panel, encoding = hbjax.from_file(path)
    writer.join(timeout=30)
    assert panel.n_rows == len(table) and len(encoding.units) == table["product"].nunique()
