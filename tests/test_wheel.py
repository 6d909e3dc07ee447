"""The release artifacts: ``python -m build`` makes a clean sdist and wheel that pass
``twine check``, and the wheel works on its own in a fresh virtual environment that has
only the core dependencies (jax, optax, numpy) and no flax.

Needs the package registry (the fresh environment installs jax/optax/numpy from it);
skipped where the registry cannot be reached, except under ``CI=true``, where an
unreachable registry is a failure (CI has just installed from it).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# Paths of the repository that are not part of any distribution and are big or
# machine-specific: never copied into the build folder.
NOT_COPIED = {
    ".git",
    ".venv",
    "_build",
    "build",
    "dist",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
    "lora_optax.egg-info",
}
CORE = {"jax", "optax", "numpy"}
OPTIONAL = [
    "flax",
    "orbax-checkpoint",
    "qwix",
    "google-tunix",
    "torch",
    "safetensors",
    "tokenizers",
    "transformers",
]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


def _clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    }
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)
    return env


def _registry_reachable() -> tuple[bool, str]:
    # One small index query; a network failure here means the fresh install cannot work.
    probe = _run([sys.executable, "-m", "pip", "index", "versions", "optax"], env=_clean_env())
    return probe.returncode == 0, probe.stderr[-2000:]


@pytest.fixture(scope="session")
def dists(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("build")
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(
        ROOT,
        src,
        dirs_exist_ok=True,
        ignore=lambda _d, names: [n for n in names if n in NOT_COPIED],
    )
    out = tmp_path_factory.mktemp("dist")
    # The default `python -m build`: sdist first, then the wheel built from the sdist
    # (so a file missing from the sdist breaks the wheel too), in isolated build envs.
    result = _run([sys.executable, "-m", "build", "--outdir", str(out), str(src)], env=_clean_env())
    if result.returncode != 0 and not _registry_reachable()[0] and os.environ.get("CI") != "true":
        pytest.skip("package registry unreachable: cannot fetch the build backend")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = out.glob("lora_optax-*.whl")
    (sdist,) = out.glob("lora_optax-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def test_twine_check(dists):
    pytest.importorskip("twine")
    result = _run(
        [
            sys.executable,
            "-m",
            "twine",
            "check",
            "--strict",
            str(dists["wheel"]),
            str(dists["sdist"]),
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASSED") == 2, result.stdout


def test_version_single_sourced(dists):
    import lora_optax
    from lora_optax._version import __version__

    assert lora_optax.__version__ == __version__
    assert dists["wheel"].name.startswith(f"lora_optax-{__version__}-py3-none-any")
    assert dists["sdist"].name == f"lora_optax-{__version__}.tar.gz"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # the version is written once, in lora_optax/_version.py
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    dynamic = pyproject["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "lora_optax._version.__version__"}
    literal = [
        str(p)
        for p in (ROOT / "lora_optax").rglob("*.py")
        if re.search(r"^__version__\s*=", p.read_text(), re.M)
    ]
    assert literal == [str(ROOT / "lora_optax" / "_version.py")], literal


def test_wheel_contents(dists):
    with zipfile.ZipFile(dists["wheel"]) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    top = {n.split("/")[0] for n in names}
    assert top == {"lora_optax", f"{dists['wheel'].name.split('-py3')[0]}.dist-info"}, top
    assert "lora_optax/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".orig", ".rej"))]
    # every subpackage of the source tree is shipped
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "lora_optax").rglob("__init__.py")}
    shipped = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    assert packages == shipped, packages ^ shipped
    # core requirements: jax, optax, numpy and nothing else outside the extras
    core = {
        re.split(r"[ <>=!~;\[]", line.split(":", 1)[1].strip())[0].lower()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    }
    assert core == CORE, core
    assert "License-Expression: Apache-2.0" in metadata
    for field in ("Project-URL:", "Keywords:", "Classifier: Typing :: Typed"):
        assert field in metadata


def test_sdist_contents(dists):
    with tarfile.open(dists["sdist"]) as tf:
        names = [m.name.split("/", 1)[1] for m in tf.getmembers() if "/" in m.name]
    top = {n.split("/")[0] for n in names if n}
    assert top <= {
        "lora_optax",
        "lora_optax.egg-info",
        "LICENSE",
        "README.md",
        "CHANGELOG.md",
        "MANIFEST.in",
        "PKG-INFO",
        "pyproject.toml",
        "setup.cfg",
    }, top
    assert {"lora_optax", "LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml"} <= top
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


WHEEL_SMOKE = textwrap.dedent(
    """
    import importlib.metadata, importlib.util, json, sys
    import jax, jax.numpy as jnp, optax
    import lora_optax as lox

    params = {"layer": {"lora_a": jnp.full((6, 2), 0.1), "lora_b": jnp.zeros((2, 5))},
              "bias": jnp.zeros(5)}
    target = jnp.arange(30.0).reshape(6, 5) / 30.0

    def loss(p):
        w = p["layer"]["lora_a"] @ p["layer"]["lora_b"]
        return jnp.sum((w + p["bias"] - target) ** 2)

    out = {}
    for name, tx in [("scaled_adamw", lox.scaled_adamw(1e-2)), ("lora_rite", lox.lora_rite(1e-2)),
                     ("lora_plus", lox.lora_plus(1e-2))]:
        p, state = params, tx.init(params)

        @jax.jit
        def step(p, state):
            value, grads = jax.value_and_grad(loss)(p)
            updates, state = tx.update(grads, state, p)
            return optax.apply_updates(p, updates), state, value

        for _ in range(3):
            p, state, value = step(p, state)
        out[name] = [float(loss(params)), float(loss(p))]
    try:
        import lora_optax.flax  # noqa: F401
        flax_error = None
    except ImportError as e:
        flax_error = str(e)
    print(json.dumps({
        "file": lox.__file__, "version": lox.__version__, "losses": out,
        "flax_spec": importlib.util.find_spec("flax") is not None, "flax_error": flax_error,
        "requires": importlib.metadata.requires("lora_optax"),
        "installed": sorted(d.metadata["Name"].lower() for d in importlib.metadata.distributions()),
    }))
    """
)


def test_wheel_works_alone(dists, tmp_path):
    env = _clean_env()
    venv = tmp_path / "venv"
    # no pip inside the venv: this interpreter's pip installs into it (--python)
    result = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env=env)
    assert result.returncode == 0, result.stderr
    python = venv / "bin" / "python"
    # the wheel and what its metadata pulls, at this environment's versions of the core
    # dependencies (tested here), resolved by pip from the registry
    pins = tmp_path / "pins.txt"
    pins.write_text(
        "".join(
            f"{d}=={importlib.metadata.version(d)}\n" for d in ("jax", "jaxlib", "optax", "numpy")
        )
    )
    result = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "-c",
            str(pins),
            str(dists["wheel"]),
        ],
        env=env,
        cwd=tmp_path,
    )
    if result.returncode != 0:
        reachable, why = _registry_reachable()
        if not reachable and os.environ.get("CI") != "true":
            pytest.skip(f"package registry unreachable: {why[-300:]}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    result = _run([str(python), "-c", WHEEL_SMOKE], env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(info["file"]).is_relative_to(venv), info["file"]
    import lora_optax

    assert info["version"] == lora_optax.__version__
    assert not info["flax_spec"], info["installed"]
    assert info["flax_error"] is not None and "flax" in info["flax_error"]
    assert not set(OPTIONAL) & set(info["installed"]), info["installed"]
    core = {re.split(r"[ <>=!~;\[]", r)[0].lower() for r in info["requires"] if "extra ==" not in r}
    assert core == CORE, info["requires"]
    for name, (before, after) in info["losses"].items():
        assert after < before, (name, before, after)  # three steps reduce the loss
