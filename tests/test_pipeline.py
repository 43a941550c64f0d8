"""FitConfig and fit_elasticities: the configuration the CLI builds, and the fit it runs."""

import jax
import numpy as np
import pandas as pd
import pytest

import hbjax
from hbjax.cli import main

pytestmark = pytest.mark.usefixtures("standard_promotion")


def test_defaults_and_derived_choices():
    config = hbjax.FitConfig()
    assert config.guide == "unitblock" and config.gradient == "dreg" and config.alpha == 0
    assert hbjax.FitConfig(alpha=0.5).gradient == "total"  # DReG is for alpha 0 only
    assert config.max_steps(1000) == 20_000
    assert hbjax.FitConfig(batch_size=10).max_steps(100) == 2_500  # 250 epochs
    assert hbjax.FitConfig(steps=7, batch_size=10).max_steps(100) == 7


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"guide": "fullrank"}, "guide must be one of"),
        ({"guide": "lowrank", "batch_size": 8}, "cannot be minibatched"),
        ({"gradient": "dreg", "alpha": 0.5}, "dreg needs alpha 0"),
        ({"gradient": "stl"}, "biased"),
        ({"hierarchy": "flat"}, "hierarchy must be one of"),
    ],
)
def test_impossible_configurations_are_refused(options, words):
    with pytest.raises(ValueError, match=words):
        hbjax.FitConfig(**options)


def test_the_cli_writes_what_the_library_computes(tmp_path, capsys):
    sim = hbjax.simulate(n_units=30, n_periods=12, n_groups=3, seed=5)
    sim.frame.to_csv(tmp_path / "panel.csv", index=False)
    flags = ["--steps", "60", "--seed", "3", "--guide", "meanfield", "--no-progress"]
    code = main(["fit", str(tmp_path / "panel.csv"), *flags, "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err
    panel, encoding = hbjax.from_file(tmp_path / "panel.csv")
    config = hbjax.FitConfig(steps=60, seed=3, guide="meanfield", progress=False)
    result = hbjax.fit_elasticities(panel, config, mesh=hbjax.make_mesh())
    expected = hbjax.summarize(result, encoding, key=jax.random.key(3)).units
    written = pd.read_csv(tmp_path / "o" / "elasticities.csv")
    assert written["product"].tolist() == expected["product"].astype(str).tolist()
    for column in ("mean", "sd", "q05", "q95"):
        np.testing.assert_allclose(written[column], expected[column], rtol=1e-5, atol=1e-6)
