"""Test configuration: 8 fake CPU devices for the sharding tests, and compile-time
savings (the suite is dominated by compiling many small programs)."""

import os
import shutil
import tempfile

# Must be set before jax initialises its backends.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
# The suite's programs are small and compiled once each, so compiling dominates: LLVM at
# -O0 cuts that by a quarter (tests/test_lora_rite.py: 68 s -> 51 s on 2 cores) while a
# real Gemma 3 train step runs 0.67 s -> 0.72 s. Numerics are XLA's either way (the HLO
# passes are the same); benchmarks and users keep the default.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA calls LAPACK (eigh, Cholesky, QR of the r×r algebra) from its own threads; OpenBLAS
# threads on top oversubscribe two cores shared by two xdist workers (see
# benchmarks/optimizer_overhead.py; tests/test_lora_rite.py + test_linalg.py: 50 -> 47 s).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# One persistent compilation cache for the whole run, shared by the xdist workers and the
# subprocesses (they inherit the environment set here, in the controller): many tests
# compile the same program through a fresh closure, which jit's in-memory cache misses
# and the HLO-keyed persistent cache hits (tests/test_common.py on two optimizers: 108 s
# -> 70 s, starting cold). Removed when the run ends; an existing setting is kept.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="lora_optax_tests_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402 (after the environment above)
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=10,
    derandomize=True,  # CI runs the same examples every time; use "dev" to explore
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev",
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def x64():
    """Runs the test with 64-bit floats enabled."""
    with jax.enable_x64(True):
        yield


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# Heaviest modules first (seconds of worker time, setup + call + teardown summed, in one
# full run on 2 cores, 2026-12-07): with --dist loadfile each module is one unit of
# work, so a heavy one scheduled last would leave the other worker idle at the end.
HEAVY_FIRST = (
    "test_common.py",  # 263 s
    "test_gemma3.py",  # 164 s
    "test_robustness.py",  # 114 s
    "test_peft_trainer.py",  # 100 s
    "test_checkpoint_state.py",  # 81 s
    "test_sharding.py",  # 71 s
    "test_benchmarks_smoke.py",  # 61 s
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))
