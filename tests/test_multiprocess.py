"""Multi-process (multi-host) training on CPU: 2 processes × 2 devices each.

The test launches two Python processes (``python -m tests.test_multiprocess <id> ...``)
that join one JAX job with ``jax.distributed.initialize`` (gloo CPU collectives),
exactly as two hosts would. Each sees 4 global devices, 2 of them its own. They follow
the multi-host recipe of :func:`lora_optax.state_shardings` (and the README): a
``(data, model) = (process_count, local_device_count)`` mesh, ``A`` / ``B`` sharded
FSDP-style over their non-rank axes (``A``'s input axis across the processes), every
process building only its own shards with ``jax.make_array_from_callback``, the
state laid out by ``jax.jit(tx.init, out_shardings=state_shardings(tx, params))``,
then a few jitted steps of ``lora_rite`` and ``scaled_adamw``.

Checked, against a single-process run of the same steps in the test's own process:

* the final params and state, gathered with ``multihost_utils.process_allgather``,
  equal the single-process ones (float32 tolerance: sharded sums reassociate);
* every process holds exactly the reference's values in its addressable shards, and
  (for the factors sharded across processes) not the whole array;
* the state's shardings after the jitted steps are those ``state_shardings`` predicted.

Skipped, with the worker's error as reason, where multi-process CPU collectives are
unavailable; every wait has a timeout, so it cannot hang.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

NUM_PROCESSES = 2
LOCAL_DEVICES = 2
STEPS = 3
OPTIMIZERS = ("lora_rite", "scaled_adamw")
INIT_TIMEOUT_S = 30  # jax.distributed.initialize
RUN_TIMEOUT_S = 240  # the whole worker (imports, compilation, steps) on a loaded CI box
# Printed by a worker once it has joined the job: a worker that dies before (jax
# aborts the process when the coordination service is unreachable) means no
# multi-process CPU support here, and the test skips; any later failure fails it.
READY = "multiprocess-worker-ready"

_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- shared


def _run_steps(case_name: str, params: Any, *, sharded: bool = False):
    """``STEPS`` jitted steps of the case's optimizer on the factorization problem.

    Returns ``(params, state, predicted)``; ``sharded``: the params are global arrays
    and the state is laid out by ``lora_optax.state_shardings`` (``predicted``).
    """
    import jax
    import optax

    import lora_optax as lox
    from tests.optimizer_cases import CASES
    from tests.problems import FactorizationProblem

    (case,) = [c for c in CASES if c.name == case_name]
    problem = FactorizationProblem.create(seed=0)
    tx = case.make(learning_rate=case.learning_rate)

    @jax.jit
    def step(params, state):
        grads, _ = problem.grads(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    predicted = None
    if not sharded:
        state = jax.jit(tx.init)(params)
    else:
        predicted = lox.state_shardings(tx, params)
        state = jax.jit(tx.init, out_shardings=predicted)(params)
    for _ in range(STEPS):
        params, state = step(params, state)
    return params, state, predicted


def _host_params() -> dict[str, Any]:
    """The initial params as host (NumPy) arrays, identical in every process."""
    from tests.problems import FactorizationProblem

    params = FactorizationProblem.create(seed=0).random_params(seed=2)
    return {k: _to_numpy(v) for k, v in params.items()}


def _to_numpy(tree: Any) -> Any:
    import jax

    return jax.tree.map(np.asarray, tree)


def _flat(tree: Any) -> dict[str, np.ndarray]:
    import jax

    return {
        jax.tree_util.keystr(kp): np.asarray(x)
        for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


# --------------------------------------------------------------------------- worker


def _worker(process_id: int, port: int, out_dir: str) -> int:
    import jax

    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=NUM_PROCESSES,
            process_id=process_id,
            initialization_timeout=INIT_TIMEOUT_S,
        )
        assert jax.process_count() == NUM_PROCESSES
        assert jax.device_count() == NUM_PROCESSES * LOCAL_DEVICES
    except Exception as e:  # no multi-process CPU support here: the test skips
        print(f"multi-process CPU setup failed: {type(e).__name__}: {e}", flush=True)
        return 1
    print(READY, flush=True)

    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    from tests.test_sharding import param_specs

    # The recipe of lora_optax.state_shardings' docstring.
    mesh = jax.make_mesh((jax.process_count(), jax.local_device_count()), ("data", "model"))
    specs = param_specs(mesh, "fsdp")
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    host = _host_params()
    for name in OPTIMIZERS:
        params = jax.tree.map(
            lambda h, s: jax.make_array_from_callback(h.shape, s, lambda idx, h=h: h[idx]),
            host,
            shardings,
        )
        params, state, predicted = _run_steps(name, params, sharded=True)
        # The state keeps the predicted layout through the jitted steps.
        for (kp, leaf), want in zip(
            jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(predicted)
        ):
            assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (
                name,
                jax.tree_util.keystr(kp),
                leaf.sharding,
                want,
            )
        record: dict[str, np.ndarray] = {}
        for prefix, tree in (("params", params), ("state", state)):
            gathered = multihost_utils.process_allgather(tree, tiled=True)
            for key, value in _flat(gathered).items():
                record[f"{prefix}{key}"] = value
            # This process's own shards, NaN elsewhere.
            for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
                if not np.issubdtype(leaf.dtype, np.floating):
                    continue
                local = np.full(leaf.shape, np.nan, np.float64)
                for shard in leaf.addressable_shards:
                    local[shard.index] = np.asarray(shard.data, np.float64)
                record[f"local:{prefix}{jax.tree_util.keystr(kp)}"] = local
        np.savez(os.path.join(out_dir, f"{name}-{process_id}.npz"), **record)
    multihost_utils.sync_global_devices("done")
    jax.distributed.shutdown()
    return 0


# --------------------------------------------------------------------------- test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out_dir: str) -> list[tuple[int, str]]:
    """Runs the workers; returns (exit code, output) per process."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
    env["PYTHONPATH"] = os.pathsep.join([str(_ROOT), env.get("PYTHONPATH", "")])
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.test_multiprocess", str(i), str(port), out_dir],
            cwd=_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(NUM_PROCESSES)
    ]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = "\n".join(
            f"--- process {i}\n{p.communicate()[0][-3000:]}" for i, p in enumerate(procs)
        )
        pytest.fail(f"multi-process workers did not finish in {RUN_TIMEOUT_S} s:\n{logs}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


@pytest.fixture(scope="session")
def worker_results():
    with tempfile.TemporaryDirectory() as out_dir:
        results = _launch(out_dir)
        for code, out in results:
            if READY not in out:
                lines = [line for line in out.splitlines() if not line.startswith("    @")]
                reason = " | ".join(lines[-4:])[-600:]
                pytest.skip(f"multi-process CPU job could not be set up (exit {code}): {reason}")
        for i, (code, out) in enumerate(results):
            assert code == 0, f"process {i} failed (exit {code}):\n{out[-5000:]}"
        yield {
            (name, i): dict(np.load(os.path.join(out_dir, f"{name}-{i}.npz")))
            for name in OPTIMIZERS
            for i in range(NUM_PROCESSES)
        }


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_multiprocess_matches_single_process(name, worker_results):
    import jax

    params, state, _ = _run_steps(name, jax.tree.map(jax.numpy.asarray, _host_params()))
    want = {f"params{k}": v for k, v in _flat(params).items()}
    want.update({f"state{k}": v for k, v in _flat(state).items()})
    split = 0
    # Float32 tolerance as in tests/test_sharding.py: sharded sums reassociate.
    for i in range(NUM_PROCESSES):
        got = worker_results[(name, i)]
        assert sorted(k for k in got if not k.startswith("local:")) == sorted(want)
        for key, value in want.items():
            np.testing.assert_allclose(
                got[key], value, rtol=1e-4, atol=1e-5, err_msg=f"{name} process {i} {key}"
            )
            local = got.get(f"local:{key}")
            if local is None:
                continue
            held = ~np.isnan(local)
            np.testing.assert_allclose(
                local[held], value[held], rtol=1e-4, atol=1e-5, err_msg=f"{name} {i} {key}"
            )
            split += int(not held.all())
    # The factors sharded over "data" (and their factor-shaped state) are split
    # across the processes: the run really was multi-host.
    assert split >= 2 * NUM_PROCESSES, split


if __name__ == "__main__":
    sys.exit(_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
