"""constraints.txt: the versions a reproducible install gets, and the ones this suite ran on.

scripts/_venv.sh installs with `-c constraints.txt`, so running the suite through
scripts/test tests exactly these pins. Here: every dependency pyproject.toml names (runtime
and dev) is pinned with `==`, each pin satisfies pyproject's own minimum, and the
environment running these tests has exactly the pinned versions installed. Also the package
metadata: an SPDX license expression (a table is deprecated by setuptools).
"""

from __future__ import annotations

import tomllib
from importlib.metadata import PackageNotFoundError, metadata, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import relay

ROOT = Path(relay.__file__).resolve().parent.parent


def pins() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        [spec] = list(req.specifier)
        assert spec.operator == "==", f"constraints.txt pins with ==, not {line!r}"
        name = canonicalize_name(req.name)
        assert name not in out, f"{req.name} pinned twice"
        out[name] = spec.version
    return out


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def test_every_declared_dependency_is_pinned_within_its_minimum() -> None:
    pinned = pins()
    for req in declared():
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is in pyproject.toml but not in constraints.txt"
        assert req.specifier.contains(pinned[name]), (
            f"constraints.txt pins {req.name}=={pinned[name]}, outside pyproject's {req}")


@pytest.mark.parametrize("name", sorted(pins()))
def test_this_environment_runs_the_pinned_version(name: str) -> None:
    try:
        installed = version(name)
    except PackageNotFoundError:
        pytest.fail(f"{name} is pinned but not installed: run scripts/test, which installs "
                    "the pins into .venv")
    assert installed == pins()[name], (
        f"{name} {installed} is installed, constraints.txt pins {pins()[name]}: run "
        "scripts/test (it reinstalls when constraints.txt changes)")


def test_license_is_an_spdx_expression() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "MIT"
    # What the build made of it (setuptools >= 77 writes Metadata 2.4's License-Expression).
    assert metadata("relay")["License-Expression"] == "MIT"
