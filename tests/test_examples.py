import pathlib
import runpy
import sys

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).parent.parent / "examples").glob("*.py"))

pytestmark = pytest.mark.usefixtures("standard_promotion")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_in_short_mode(path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(path), "--short"])
    runpy.run_path(str(path), run_name="__main__")
    assert capsys.readouterr().out.strip(), "an example prints its result"
