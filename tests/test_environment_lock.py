"""The environment `make` builds is exactly requirements/lock.txt, and the lock satisfies setup.py.

A package that `pip install -e .[dev,hf]` pulls in but the lock does not pin would float with
PyPI: a fresh clone next week would test something else. These tests fail when a dependency is
added to setup.py without regenerating the lock (tools/lock_environment.sh).
"""

from __future__ import annotations

import ast
import os
import sys
import sysconfig
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(ROOT, "requirements", "lock.txt")
PROJECT = canonicalize_name("megatron_mosaic")


def _locked() -> dict[str, Version]:
    pins = {}
    with open(LOCK, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, version = line.partition("==")
            assert sep, f"{LOCK}:{number}: not a 'name==version' pin: {line!r}"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _setup_requirements() -> list[Requirement]:
    """install_requires and every extra except 'te' (CUDA-only), read from setup.py's AST."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    reqs = list(kw["install_requires"])
    for extra, items in kw["extras_require"].items():
        if extra != "te":
            reqs.extend(items)
    return [Requirement(r) for r in reqs]


def test_lock_satisfies_setup_ranges():
    pins = _locked()
    for req in _setup_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"setup.py requires {req} but requirements/lock.txt does not pin it"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements/lock.txt pins {req.name}=={pins[name]}, outside setup.py's range {req}")


def _in_make_venv() -> bool:
    return os.path.realpath(sys.prefix) == os.path.realpath(os.path.join(ROOT, ".venv"))


@pytest.mark.skipif(not _in_make_venv(), reason="checks the .venv that `make` builds")
def test_installed_environment_is_the_lock():
    pins = _locked()
    installed = {}
    # Only what pip installed into the venv: once something imports setuptools, its vendored
    # packages (setuptools/_vendor) join sys.path and would be listed too.
    site_dirs = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    for dist in metadata.distributions(path=site_dirs):
        name = canonicalize_name(dist.metadata["Name"])
        if name != PROJECT:
            installed[name] = Version(dist.version)
    unpinned = sorted(n for n in installed if n not in pins)
    assert not unpinned, f"installed but not pinned in requirements/lock.txt: {unpinned}"
    moved = {n: (str(installed[n]), str(v)) for n, v in pins.items()
             if n in installed and installed[n].public != v.public}
    assert not moved, f"installed versions differ from the lock (installed, locked): {moved}"
