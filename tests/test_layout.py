"""Package shape: short modules, and the old import paths of split modules still work."""

from pathlib import Path

import minefield

PACKAGE = Path(minefield.__file__).parent


def test_no_module_is_over_about_400_lines():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines())
             for p in PACKAGE.rglob("*.py")}
    assert {k: n for k, n in sizes.items() if n > 400} == {}


def test_split_modules_keep_their_old_imports():
    from minefield import basin, data, files, functional, imagefiles, radii, rollout, runs, stacked

    for name in ("RunError", "atomic_write", "write_json", "read_json", "save_tensors",
                 "load_tensors", "read_limited", "reading"):
        assert getattr(runs, name) is getattr(files, name)
    assert runs.RunError.__module__ == "minefield.runs"  # tracebacks name its public home
    assert basin.find_radii is radii.find_radii and basin.radius_grid is radii.radius_grid
    assert basin.rollouts is rollout.rollouts and basin.Rollouts is rollout.Rollouts
    assert data.DATASETS["cifar10"].__module__ == "minefield.data"  # reads imagefiles lazily
    assert callable(imagefiles.cifar10) and callable(imagefiles.svhn)
    for name in ("stack", "member", "one", "check_single", "n_members", "flatten", "unflatten"):
        assert getattr(functional, name) is getattr(stacked, name)
