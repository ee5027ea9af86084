"""`make test` runs every docstring example: setup.cfg collects the package's doctests."""

import configparser
from pathlib import Path


def test_pytest_collects_the_package_doctests():
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).parents[1] / "setup.cfg")
    opts = cfg["tool:pytest"]
    assert "minefield" in opts["testpaths"].split()
    assert "--doctest-modules" in opts["addopts"].split()
