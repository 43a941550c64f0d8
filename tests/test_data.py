import numpy as np
import pandas as pd
import pytest
from tolerances import f32_atol

import hbjax
from hbjax import DataValidationError
from hbjax.counts import elasticity_data
from hbjax.io.tables import read_table


def frame(**changes):
    df = pd.DataFrame(
        {
            "product": ["a", "a", "a", "b", "b", "c"],
            "category": ["x", "x", "x", "y", "y", "x"],
            "period": [3, 1, 2, 1, 2, 2],
            "price": [2.0, 2.5, 2.2, 3.0, 2.9, 1.0],
            "units_sold": [10, 8, 9, 4, 5, 0],
        }
    )
    for column, (row, value) in changes.items():
        df[column] = df[column].astype(object)
        df.loc[row, column] = value
        df[column] = pd.Series(df[column].tolist(), index=df.index).infer_objects()
    return df


def decoded(data, unit="product", counts="units_sold"):
    """The table's rows back from the count data's codes (rows in the data's order)."""
    rows, model = data.rows, data.model
    unit_codes = np.asarray(rows.unit)
    group = np.asarray(model.table.levels["category"])[unit_codes]
    return pd.DataFrame(
        {
            unit: np.asarray(data.units)[unit_codes],
            "category": np.asarray(data.levels["category"])[group],
            "period": np.asarray(data.periods)[np.asarray(data.period)],
            "price": np.exp(np.asarray(rows.columns["x"]["log_price"], np.float64)),
            counts: np.asarray(rows.columns["counts"], np.float64),
        }
    )


def test_valid_frame_is_encoded_sorted_and_round_trips():
    df = frame()
    data = elasticity_data(df)
    assert (len(data.units), len(data.levels["category"]), len(data.periods)) == (3, 2, 3)
    assert len(data.rows.unit) == len(df)
    # rows sorted by unit, each unit's in the table's order
    assert np.all(np.diff(np.asarray(data.rows.unit)) >= 0)
    expected = df.sort_values("product", kind="stable").reset_index(drop=True)
    # prices come back through a float32 log: relative error = its rounding, eps |log p|
    rtol = f32_atol(terms=1, magnitude=np.abs(np.log(df["price"])).max() + 1)
    pd.testing.assert_frame_equal(decoded(data), expected, check_dtype=False, rtol=rtol)
    group_of_unit = np.asarray(data.levels["category"])[
        np.asarray(data.model.table.levels["category"])
    ]
    assert list(group_of_unit) == ["x", "y", "x"]
    assert np.all(np.asarray(data.rows.weight) == 1.0)
    assert data.rows.columns["counts"].dtype == np.float32 and data.rows.unit.dtype == np.int32


def test_custom_column_names_and_dates(tmp_path):
    df = frame().rename(columns={"product": "sku", "units_sold": "qty"})
    df["period"] = pd.to_datetime("2024-01-01") + pd.to_timedelta(df["period"] * 7, unit="D")
    data = elasticity_data(df, unit="sku", counts="qty")
    assert data.spec.unit == "sku" and len(data.periods) == 3
    assert data.periods[0] == pd.Timestamp("2024-01-08")
    # ISO text dates, as in a CSV, are read as dates
    df.assign(period=df["period"].dt.strftime("%Y-%m-%d")).to_csv(tmp_path / "t.csv", index=False)
    again = elasticity_data(tmp_path / "t.csv", unit="sku", counts="qty")
    assert again.periods.equals(data.periods)
    np.testing.assert_array_equal(data.period, again.period)


# (changes to the valid frame or a replacement frame, words the message must contain)
BAD_INPUTS = {
    "missing column": (lambda: frame().drop(columns="price"), ["price", "missing column"]),
    "empty frame": (lambda: frame().iloc[:0], ["empty"]),
    "nan price": (lambda: frame(price=(2, np.nan)), ["'price'", "index 2"]),
    "infinite price": (lambda: frame(price=(1, np.inf)), ["'price'", "index 1"]),
    "zero price": (lambda: frame(price=(4, 0.0)), ["'price'", "> 0", "index 4"]),
    "negative price": (lambda: frame(price=(0, -1.0)), ["'price'", "index 0"]),
    "negative units": (lambda: frame(units_sold=(3, -2)), ["'units_sold'", "negative", "index 3"]),
    "fractional units": (lambda: frame(units_sold=(1, 2.5)), ["whole numbers", "index 1"]),
    "nan units": (lambda: frame(units_sold=(5, np.nan)), ["NaN", "index 5"]),
    "text in numeric column": (lambda: frame(price=(2, "cheap")), ["'price'", "cheap", "index 2"]),
    "unit in two groups": (lambda: frame(category=(2, "y")), ["'a'", "more than one group"]),
    "duplicated unit-period": (lambda: frame(period=(1, 3)), ["more than once", "Aggregate"]),
    "column given twice": (None, ["given for both"]),
    "huge counts": (lambda: frame(units_sold=(0, 2**25)), ["float32"]),
    "infinite units": (lambda: frame(units_sold=(2, np.inf)), ["'units_sold'", "infinite"]),
    "price beyond float32": (lambda: frame(price=(1, 1e39)), ["'price'", "float32", "index 1"]),
    "single unit": (lambda: frame().iloc[:3], ["single unit", "'a'", "at least 2"]),
    "single period": (
        lambda: frame().drop_duplicates("product").assign(period=1),
        ["single period", "at least 2 periods"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_validation_errors_name_the_problem(case):
    make, words = BAD_INPUTS[case]
    with pytest.raises(DataValidationError) as info:
        if case == "column given twice":
            elasticity_data(frame(), groups=("product",))
        else:
            elasticity_data(make())
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("period", "words"), [((0, 1.5), "integer periods or dates"), ((3, "soon"), "2024-01-31")]
)
def test_bad_periods_in_a_file_are_named(tmp_path, period, words):
    path = tmp_path / "t.csv"
    frame(period=period).to_csv(path, index=False)
    with pytest.raises(DataValidationError, match=f"'period'.*{words}"):
        elasticity_data(path)


def test_weak_units_and_groups_warn_but_fit():
    # product c is seen once (one price) and category y holds only product b
    with pytest.warns(hbjax.DataWarning) as caught:
        data = elasticity_data(frame())
    messages = [str(w.message) for w in caught]
    assert any("never change price" in m and "'c'" in m for m in messages), messages
    assert any("single unit" in m and "'y'" in m for m in messages), messages
    assert len(data.units) == 3
    varied = frame().assign(category="x")  # one group of three units
    extra_c = varied.iloc[[5]].assign(period=3, price=1.2)  # c's price now changes
    varied = pd.concat([varied, extra_c], ignore_index=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", hbjax.DataWarning)
        elasticity_data(varied)  # every unit's price varies, one group of three: no warning


def test_a_covariate_the_same_in_every_row_warns():
    """The data say nothing about its slope: its estimates would be the prior's."""
    with pytest.warns(hbjax.DataWarning, match="'promo' is 0 in every row.*the prior's"):
        elasticity_data(frame().assign(promo=0), covariates=["promo"])
    with pytest.warns(hbjax.DataWarning, match="'price' is 2 in every row"):
        elasticity_data(frame().assign(price=2.0))


def test_two_columns_with_one_name():
    # (a CSV cannot carry this: pandas renames the second column "price.1" on reading)
    df = frame()
    df.insert(4, "price", df.pop("price"), allow_duplicates=True)
    df.insert(5, "price", df["units_sold"], allow_duplicates=True)
    with pytest.raises(DataValidationError, match="two columns named 'price'"):
        elasticity_data(df)


def test_not_a_dataframe():
    # The test-time type checker would reject the call first; users without it get this error.
    from_frame = hbjax.counts.from_frame
    unchecked = getattr(from_frame, "__wrapped__", from_frame)
    with pytest.raises(DataValidationError, match="read_table"):
        unchecked({"product": [1]}, unit="product", counts="units_sold")


def test_read_table_csv_parquet_and_errors(tmp_path):
    df = frame()
    df.to_csv(tmp_path / "p.csv", index=False)
    df.to_parquet(tmp_path / "p.parquet", index=False)
    a = elasticity_data(tmp_path / "p.csv")
    b = elasticity_data(tmp_path / "p.parquet")
    np.testing.assert_array_equal(a.rows.columns["counts"], b.rows.columns["counts"])
    with pytest.raises(DataValidationError, match="no such file"):
        read_table(tmp_path / "nope.csv")
    with pytest.raises(DataValidationError, match=r"\.csv or \.parquet"):
        read_table(tmp_path / "p.xlsx")
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataValidationError, match="as Parquet"):
        read_table(tmp_path / "broken.parquet")


# Property-based: random small tables either become count data whose decoded rows equal the
# input, or raise the documented DataValidationError; never another exception.
from hypothesis import event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_labels = st.one_of(st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 3))
_row = st.tuples(
    _labels,
    st.sampled_from(["x", "y"]),
    st.integers(0, 4),
    st.floats(0.01, 100.0),
    st.integers(0, 50),
)
# at most one corrupted cell: a bad value in a numeric column or an odd period
_corruption = st.one_of(
    st.none(),
    st.tuples(
        st.sampled_from(["price", "units_sold", "period"]),
        st.integers(0, 11),
        st.sampled_from([0.0, -1.0, np.nan, np.inf, 2.5, 2**25, "x", "2024-13-01"]),
    ),
)


@st.composite
def _tables(draw):
    rows = draw(st.lists(_row, min_size=0, max_size=12, unique_by=lambda r: (repr(r[0]), r[2])))
    df = pd.DataFrame(rows, columns=["product", "category", "period", "price", "units_sold"])
    # each product in one category, except when a drawn flag moves one row elsewhere
    df["category"] = df["product"].map(lambda p: "xy"[len(repr(p)) % 2])
    if len(df) and draw(st.booleans()) and draw(st.booleans()):
        df.loc[0, "category"] = "z"
    corruption = draw(_corruption)
    if corruption is not None and len(df):
        column, row, value = corruption
        df[column] = df[column].astype(object)
        df.loc[row % len(df), column] = value
        df[column] = pd.Series(df[column].tolist(), index=df.index).infer_objects()
    return df


@settings(max_examples=200, deadline=None)
@given(_tables())
def test_random_tables_round_trip_or_are_refused(df):
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hbjax.DataWarning)
            data = elasticity_data(df)
    except DataValidationError as error:
        assert str(error)  # a message, one of the documented checks
        event("refused")
        return
    got = decoded(data)
    expected = df.assign(
        price=df["price"].astype(np.float64), units_sold=df["units_sold"].astype(np.float64)
    )
    key = lambda frame: frame.assign(product=frame["product"].map(repr))  # noqa: E731
    expected = key(expected).sort_values(["product", "period"]).reset_index(drop=True)
    got = key(got).sort_values(["product", "period"]).reset_index(drop=True)
    assert list(got["product"]) == list(expected["product"])  # labels exactly, with types
    assert list(got["category"]) == list(expected["category"])
    assert list(got["period"]) == list(expected["period"])
    # through a float32 log: relative error = its rounding, eps |log p|
    rtol = f32_atol(terms=1, magnitude=np.abs(np.log(expected["price"])).max() + 1)
    np.testing.assert_allclose(got["price"], expected["price"], rtol=rtol)
    np.testing.assert_array_equal(got["units_sold"], expected["units_sold"])
    assert len(data.units) >= 2 and len(data.periods) >= 2
    event("valid panel")  # hypothesis statistics: how many examples got this far
