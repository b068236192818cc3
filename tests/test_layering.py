"""The shared code needs no backend, and the two backends meet only through arrays and HF names."""
import subprocess
import sys

from tests.conftest import REPO

PROBE = """
import importlib, pkgutil, sys
import {package}
for m in pkgutil.walk_packages({package}.__path__, "{package}."):
    importlib.import_module(m.name)
print(" ".join(sorted(m for m in ("jax", "flax", "torch", "transformers", "hammer_jax", "hammer_torch")
                      if m in sys.modules)))
"""


def _imported_by(package: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(package=package)], cwd=REPO,
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_every_hammer_module_imports_without_jax_or_torch():
    assert _imported_by("hammer") == set()


def test_the_jax_backend_never_imports_torch_or_the_twin():
    assert _imported_by("hammer_jax") & {"torch", "hammer_torch"} == set()


def test_the_torch_twin_never_imports_jax_or_the_flax_model():
    assert _imported_by("hammer_torch") & {"jax", "flax", "hammer_jax"} == set()
