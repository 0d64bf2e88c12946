"""Packaging: a wheel (non-editable) install ships the recipes of ``conf/``, and recipes are
found wherever statten runs.

The wheel test builds a wheel of the working tree (a copy of it, so the checkout is not written),
installs it with ``pip --target`` and runs Python in a folder outside the repository with only
that install on ``PYTHONPATH``: the repository's ``statten`` and ``conf/`` are out of reach.
Offline and about 20 s (pip's build of a pure-Python wheel, one torch import).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from statten import config as config_module
from statten.config import ConfigError, build_parser, parse_config

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
RECIPE = "conf/cifar10/2_512_200E_t4.yml"
# Settings compared between a recipe file and the configuration parsed from it.
KEYS = ("dataset", "num_classes", "opt", "lr", "epochs", "sched", "dim", "layer", "time_steps")
# Copied to build the wheel: what the build reads (the project's metadata, code and recipes).
SOURCES = ("pyproject.toml", "README.md", "MANIFEST.in", "statten", "conf")
# The oldest release of each dependency with every API statten calls (pyproject.toml says more).
API_FLOORS = {
    "torch": "2.5",  # torch.serialization.safe_globals
    "timm": "1.0.12",  # NativeScaler(device=...)
    "spikingjelly": "2.0",  # spikingjelly.datasets.cifar10_dvs._load_origin_data
}
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]

CHECK = textwrap.dedent(
    """
    import json, sys
    import statten
    from statten import config

    default = config.parse_config([], "train")
    recipe = config.parse_config(["-c", sys.argv[1]], "train")
    keys = sys.argv[2].split(",")
    print(json.dumps({
        "statten": statten.__file__,
        "recipes": str(config.RECIPES_DIR),
        "default_recipe": str(config.DEFAULT_CONFIG),
        "default": {key: getattr(default, key) for key in keys},
        "recipe": {key: getattr(recipe, key) for key in keys},
    }))
    """
)


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of the working tree, built offline with the venv's setuptools."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        elif path.is_file():
            shutil.copy2(path, source / name)
    build = ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp)]
    _run([*PIP, *build, str(source)], cwd=tmp)
    (path,) = tmp.glob("statten-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel: Path) -> dict[str, Any]:
    """What a wheel install of statten reports, run from a folder outside the repository."""
    site = wheel.parent / "site"
    _run([*PIP, "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
         cwd=wheel.parent)  # fmt: skip
    work = wheel.parent / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}
    out = _run([sys.executable, "-c", CHECK, RECIPE, ",".join(KEYS)], cwd=work, env=env)
    return {"site": site, **json.loads(out.strip().splitlines()[-1])}


def _recipe(path: Path) -> dict[str, Any]:
    values = yaml.safe_load(path.read_text())
    return {key: values[key] for key in KEYS if key in values}


def test_wheel_ships_every_recipe(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {f"statten/conf/{p.relative_to(CONF).as_posix()}" for p in CONF.rglob("*.yml")}
    assert "statten/conf/digits/default.yml" in recipes
    assert recipes <= names, sorted(recipes - names)


def test_wheel_ships_every_package(wheel: Path) -> None:
    """``pyproject.toml`` lists statten's packages by name: a new one must be added there."""
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "statten").rglob("__init__.py")}
    assert packages <= names, f"add to [tool.setuptools] packages: {sorted(packages - names)}"
    kernels = {p.relative_to(ROOT).as_posix() for p in (ROOT / "statten" / "fast").glob("*.[ch]")}
    assert kernels <= names, sorted(kernels - names)


def test_wheel_install_applies_the_default_recipe(installed: dict[str, Any]) -> None:
    site = Path(installed["site"]).resolve()
    assert Path(installed["statten"]).resolve().is_relative_to(site)  # not the repository's
    assert Path(installed["recipes"]) == site / "statten" / "conf"
    assert Path(installed["default_recipe"]) == site / "statten" / "conf" / "digits" / "default.yml"
    expected = _recipe(CONF / "digits" / "default.yml")
    assert {"num_classes", "opt", "epochs"} <= expected.keys()
    assert installed["default"] == {**installed["default"], **expected}
    parser_defaults = vars(build_parser("train").parse_args([]))
    assert all(expected[key] != parser_defaults[key] for key in ("num_classes", "opt", "epochs"))


def test_wheel_install_finds_a_conf_recipe_from_any_folder(installed: dict[str, Any]) -> None:
    expected = _recipe(ROOT / RECIPE)
    assert expected["num_classes"] == 10 and expected["dim"] == 512
    assert installed["recipe"] == {**installed["recipe"], **expected}


def test_conf_recipe_resolves_outside_the_checkout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(["-c", RECIPE, "--lr", "0.5"], "train")
    expected = _recipe(ROOT / RECIPE)
    assert (cfg.dim, cfg.num_classes, cfg.lr) == (expected["dim"], expected["num_classes"], 0.5)


def test_a_local_file_wins_over_a_shipped_recipe(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    local = tmp_path / RECIPE
    local.parent.mkdir(parents=True)
    local.write_text("num_classes: 7\n")
    assert parse_config(["-c", RECIPE], "train").num_classes == 7


@pytest.mark.parametrize(
    "name", ["conf/cifar10/absent.yml", "conf/../pyproject.toml", "absent.yml"]
)
def test_a_config_that_is_neither_local_nor_shipped_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(["-c", name], "train")


def test_a_missing_default_recipe_is_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broken install is loud: without -c and without the digits recipe, parser defaults
    apply with a warning that says so (the defaults are ImageNet-sized: SGD, 1000 classes)."""
    missing = tmp_path / "absent.yml"
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG", missing)
    with caplog.at_level(logging.WARNING, logger="statten.config"):
        cfg = parse_config([], "train")
    assert cfg.num_classes == 1000
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert str(missing) in caplog.text and "parser defaults" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="statten.config"):
        parse_config(["-c", str(ROOT / RECIPE)], "train")
    assert not caplog.records  # with -c the default recipe is not needed


def _project() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _floor(specifier: SpecifierSet) -> Version | None:
    floors = [Version(s.version) for s in specifier if s.operator in (">=", "==", "~=")]
    return max(floors, default=None)


def _declared() -> dict[str, Requirement]:
    requirements = (Requirement(line) for line in _project()["dependencies"])
    return {r.name.lower(): r for r in requirements}


def test_declared_minimums_provide_the_apis_statten_calls() -> None:
    declared = _declared()
    for name, oldest in API_FLOORS.items():
        floor = _floor(declared[name].specifier)
        assert floor is not None and floor >= Version(oldest), f"{name}: {declared[name]}"


def test_declared_minimums_are_installable_together() -> None:
    """Where the installed release of a dependency is statten's minimum, what that release
    requires (Python, and packages statten also names) is not below statten's own minimums:
    e.g. SpikingJelly 2.0 needs Python 3.11 and torch 2.6."""
    declared = _declared()
    python_floor = _floor(SpecifierSet(_project()["requires-python"]))
    checked = 0
    for name, requirement in declared.items():
        floor = _floor(requirement.specifier)
        if floor is None or Version(metadata.version(name)) != floor:
            continue
        checked += 1
        meta = metadata.metadata(name)
        needs_python = _floor(SpecifierSet(meta.get("Requires-Python") or ""))
        assert needs_python is None or python_floor >= needs_python, (name, needs_python)
        for line in meta.get_all("Requires-Dist") or []:
            needed = Requirement(line)
            if needed.marker is None and needed.name.lower() in declared:
                ours = _floor(declared[needed.name.lower()].specifier)
                theirs = _floor(needed.specifier)
                assert theirs is None or (ours is not None and ours >= theirs), (name, line)
    assert checked, "no dependency is installed at its minimum version"


def test_the_environment_satisfies_the_declared_requirements() -> None:
    for name, requirement in _declared().items():
        installed = metadata.version(name)
        assert requirement.specifier.contains(installed, prereleases=True), (name, installed)
