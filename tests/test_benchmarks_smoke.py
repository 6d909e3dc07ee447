"""Smoke test: the synthetic theory-check benchmark runs end to end (tiny sizes)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_theory_checks_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    import jax

    old = jax.config.jax_enable_x64
    try:
        tc = _load("theory_checks")  # enables x64 at import (a script)
        rc = tc.main(["--smoke", "--optimizers", "sgd,scaled_sgd", "--out-dir", str(tmp_path)])
    finally:
        jax.config.update("jax_enable_x64", old)
    assert rc == 0
    text = (tmp_path / "theory_checks.md").read_text()
    assert "scaled_sgd" in text and "Transformation invariance" in text
    for png in ("theory_kappa_factorization.png", "theory_invariance.png"):
        assert (tmp_path / png).stat().st_size > 0
