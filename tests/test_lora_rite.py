"""LoRA-RITE (SPEC §2.2): exact formula against the NumPy reference, invariance, safeguards."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_optax as lox
from tests import reference as ref
from tests.optimizer_cases import find_state
from tests.problems import factor_matrices, stack_matrices

# name -> (A shape, B shape, batch_ndim, A key, B key). 2-D, qwix q-style (D, r)/(r, N, H),
# qwix o-style (N, H, r)/(r, D), and stacked layers.
LAYOUT = {
    "dense": ((9, 3), (3, 7), 0, "lora_a", "lora_b"),
    "dense2": ((9, 3), (3, 7), 0, "lora_a", "lora_b"),  # same shapes: stacked together
    "q": ((8, 3), (3, 2, 4), 0, "w_lora_a", "w_lora_b"),
    "o": ((2, 4, 3), (3, 6), 0, "w_lora_a", "w_lora_b"),
    "stacked": ((2, 6, 3), (2, 3, 5), 1, "lora_a", "lora_b"),
}
SCALE = 0.5  # LoRA scale s ≠ 1 (enters through the gradients only)


def _make_problem(seed: int, *, b_zero: bool = False, loss_scale: float = 1.0):
    rng = np.random.default_rng(seed)
    params, targets = {}, {}
    for name, (a_shape, b_shape, k, ka, kb) in LAYOUT.items():
        a = rng.normal(size=a_shape) / np.sqrt(np.prod(a_shape[k:-1]))
        b = np.zeros(b_shape) if b_zero else rng.normal(size=b_shape) * 0.5
        params[name] = {ka: a, kb: b}
        w_shape = a_shape[:-1] + b_shape[k + 1 :]
        targets[name] = rng.normal(size=w_shape)
    params["bias"] = rng.normal(size=(4,))
    targets["bias"] = rng.normal(size=(4,))
    return params, targets, loss_scale


def _product(a, b, k):
    a_m = a.reshape(a.shape[:k] + (-1, a.shape[-1]))
    b_m = b.reshape(b.shape[: k + 1] + (-1,))
    return (a_m @ b_m).reshape(a.shape[:-1] + b.shape[k + 1 :])


def _loss(params, targets, loss_scale):
    total = 0.0
    for name, (_, _, k, ka, kb) in LAYOUT.items():
        w = SCALE * _product(params[name][ka], params[name][kb], k)
        total = total + 0.5 * loss_scale * jnp.sum((w - targets[name]) ** 2)
    return total + 0.5 * jnp.sum((params["bias"] - targets["bias"]) ** 2)


def _to_jax(tree):
    return jax.tree.map(jnp.asarray, tree)


def _ref_pairs(params):
    """The tree's pairs as a flat list of 2-D float64 (A m×r, B r×n) matrices."""
    out = []
    for name, (_, _, k, ka, kb) in LAYOUT.items():
        a_mats = factor_matrices(params[name][ka], k, "a")
        b_mats = factor_matrices(params[name][kb], k, "b")
        out.extend(zip(a_mats, b_mats))
    return out


def _ref_grads(pairs, targets, loss_scale):
    """Gradients of the loss, computed on the reference's own matrices (NumPy)."""
    grads = []
    i = 0
    for name, (_, _, k, _, _) in LAYOUT.items():
        w = np.asarray(targets[name], np.float64)
        for w_layer in w.reshape((-1,) + w.shape[k:]) if k else w[None]:
            a, b = pairs[i]
            g = loss_scale * (SCALE * a @ b - w_layer.reshape(a.shape[0], b.shape[1]))
            grads.append((SCALE * g @ b.T, SCALE * a.T @ g))
            i += 1
    return grads


def _ref_to_tree(pairs, like):
    out = {}
    i = 0
    for name, (a_shape, b_shape, k, ka, kb) in LAYOUT.items():
        n_layers = int(np.prod(a_shape[:k])) if k else 1
        mats = pairs[i : i + n_layers]
        i += n_layers
        out[name] = {
            ka: stack_matrices([m[0] for m in mats], a_shape),
            kb: stack_matrices([m[1] for m in mats], b_shape),
        }
    return out


def _lora_state(state):
    """The ScaleByLoRARiteState inside a lora_rite state."""
    return find_state(state, lox.ScaleByLoRARiteState)


# Optimizer configurations shared by the float64 tests; each is compiled once per module.
LR, WD = 0.05, 0.01
CLIP, SKIP = 4.0, 0.55  # thresholds at which both safeguards act on some steps, not all
CONFIGS = {
    # name: (basis, safeguards, escape_mass, stack_pairs)
    "gram": ("gram", False, False, True),
    "qr": ("qr", False, False, True),
    "gram_safe_esc": ("gram", True, True, True),
    "qr_safe_esc": ("qr", True, True, True),
    "gram_safe_esc_unstacked": ("gram", True, True, False),
}
_STEPPERS: dict = {}


def _make_tx(config: str):
    basis, safe, escape, stack = CONFIGS[config]
    return lox.lora_rite(
        LR,
        weight_decay=WD,
        clip_unmagnified_grad=CLIP if safe else 0.0,
        skip_threshold=SKIP if safe else 0.0,
        escape_mass=escape,
        basis=basis,
        stack_pairs=stack,
    )


def _stepper(tx_or_config):
    """(tx, jitted step(params, state, targets)) — one compilation per configuration."""
    key = tx_or_config if isinstance(tx_or_config, str) else id(tx_or_config)
    if key not in _STEPPERS:
        tx = _make_tx(tx_or_config) if isinstance(tx_or_config, str) else tx_or_config

        @jax.jit
        def step(params, state, targets):
            grads = jax.grad(_loss)(params, targets, 1.0)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        _STEPPERS[key] = (tx, step)
    return _STEPPERS[key]


REF_CASES = [
    # (configuration, B = 0 at the start)
    ("gram", True),
    ("qr", False),
    ("gram_safe_esc", False),
    ("qr_safe_esc", True),
    ("gram_safe_esc_unstacked", True),
]


@pytest.mark.parametrize(
    "config,b_zero", REF_CASES, ids=[f"{c}-{'b0' if z else 'brand'}" for c, z in REF_CASES]
)
def test_matches_reference(x64, config, b_zero):
    """≥ 20 steps of the library equal the NumPy float64 reference (params, counters,
    basis-independent state), on 2-D, multi-axis and stacked pairs with s ≠ 1."""
    _, safeguards, escape, _ = CONFIGS[config]
    params, targets, loss_scale = _make_problem(0, b_zero=b_zero)
    lr, wd = LR, WD
    clip, skip = (CLIP, SKIP) if safeguards else (0.0, 0.0)
    tx, step = _stepper(config)
    p = _to_jax(params)
    state = tx.init(p)
    jtargets = _to_jax(targets)
    r_pairs = _ref_pairs(params)
    r_state = ref.rite_init(r_pairs)
    clipped = 0
    for _ in range(20):
        p, state = step(p, state, jtargets)
        grads = _ref_grads(r_pairs, targets, loss_scale)
        r_pairs, r_state = ref.rite_step(
            r_pairs,
            grads,
            r_state,
            lr,
            weight_decay=wd,
            clip_unmagnified_grad=clip,
            skip_threshold=skip,
            escape_mass=escape,
        )
        s = _lora_state(state)
        assert int(s.n_skipped) == r_state.n_skipped
        np.testing.assert_allclose(float(s.grad_norm), r_state.last_grad_norm, rtol=1e-10)
        clipped += safeguards and r_state.last_grad_norm > clip
        expected = _ref_to_tree(r_pairs, params)
        for name in LAYOUT:
            for key, want in expected[name].items():
                np.testing.assert_allclose(
                    np.asarray(p[name][key]), want, rtol=1e-9, atol=1e-11, err_msg=name + key
                )
    _check_invariant_state(_lora_state(state), p, CONFIGS[config][3], r_state)
    if safeguards:  # the safeguards must actually have acted
        assert 0 < r_state.n_skipped < 20 * 2 * len(r_pairs)
        assert clipped > 0
    if escape:
        assert any(ps.a.rho > 0 or ps.b.rho > 0 for ps in r_state.pairs)


def _check_invariant_state(s, params, stack_pairs, r_state):
    """State quantities that do not depend on the choice of orthonormal basis:
    eigenvalues of V̄, ‖M̄‖_F and ρ, per factor and stacked layer."""
    fs = lox.lora_rite_factor_state(s, params, stack_pairs=stack_pairs)
    i = 0
    for name, (a_shape, _, k, ka, kb) in LAYOUT.items():
        n_layers = int(np.prod(a_shape[:k])) if k else 1
        per = {}
        for role, key in (("a", ka), ("b", kb)):
            f = fs[f"{name}/{key}"]
            per[role] = (
                np.asarray(f["v"]).reshape(n_layers, 3, 3),
                factor_matrices(f["mu"], k, role),
                np.asarray(f["rho"]).reshape(n_layers),
            )
        for layer in range(n_layers):
            ps = r_state.pairs[i]
            for role, ref_fs in (("a", ps.a), ("b", ps.b)):
                v, m, rho = (x[layer] for x in per[role])
                np.testing.assert_allclose(
                    np.linalg.eigvalsh(v), np.linalg.eigvalsh(ref_fs.v), rtol=1e-8, atol=1e-12
                )
                np.testing.assert_allclose(
                    np.linalg.norm(m), np.linalg.norm(ref_fs.m), rtol=1e-8, atol=1e-12
                )
                np.testing.assert_allclose(rho, ref_fs.rho, rtol=1e-8, atol=1e-12)
            i += 1


def _run(config, params, targets, steps=20):
    """Runs a configuration (name, or a transformation) from float64 params."""
    tx, step = _stepper(config)
    p = _to_jax(params)
    state = tx.init(p)
    targets = _to_jax(targets)
    products = []
    for _ in range(steps):
        p, state = step(p, state, targets)
        products.append(
            {n: SCALE * _product(p[n][ka], p[n][kb], k) for n, (_, _, k, ka, kb) in LAYOUT.items()}
        )
    return p, state, products


def _transform(params, ts):
    """``(A T, T⁻¹ B)`` for every pair (and stacked layer), T given per pair name."""
    out = dict(params)
    for name, (_, _, k, ka, kb) in LAYOUT.items():
        t = ts[name]
        a, b = params[name][ka], params[name][kb]
        t_inv = np.linalg.inv(t)
        out[name] = {
            ka: np.einsum("...r,rs->...s", a, t),
            kb: np.moveaxis(np.tensordot(t_inv, b, axes=([1], [k])), 0, k),
        }
    return out


def _random_ts(kind: str, seed: int = 5):
    rng = np.random.default_rng(seed)
    ts = {}
    for name in LAYOUT:
        if kind == "scalar":
            ts[name] = 3.7 * np.eye(3)
        elif kind == "rotation":
            ts[name] = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        else:  # well-conditioned general
            u = np.linalg.qr(rng.normal(size=(3, 3)))[0]
            v = np.linalg.qr(rng.normal(size=(3, 3)))[0]
            ts[name] = u @ np.diag([0.25, 1.0, 4.0]) @ v
    return ts


def _max_rel_diff(xs, ys):
    worst = 0.0
    for x, y in zip(xs, ys):
        for n in x:
            d = np.linalg.norm(np.asarray(x[n]) - np.asarray(y[n]))
            worst = max(worst, d / np.linalg.norm(np.asarray(y[n])))
    return worst


@pytest.mark.parametrize("kind", ["general", "scalar", "rotation"])
@pytest.mark.parametrize("config", ["gram", "qr"])
def test_transformation_invariance(x64, kind, config):
    """Safeguards off: (A T, T⁻¹B) gives the same trajectory of s·A B (20 steps)."""
    params, targets, _ = _make_problem(1)
    _, _, ref_traj = _run(config, params, targets)
    _, _, t_traj = _run(config, _transform(params, _random_ts(kind)), targets)
    assert _max_rel_diff(t_traj, ref_traj) < 1e-9


def test_transformation_invariance_with_safeguards_and_escape(x64):
    """The safeguards and the escaped mass depend on basis-free norms only."""
    params, targets, _ = _make_problem(1)
    _, s1, ref_traj = _run("gram_safe_esc", params, targets)
    _, s2, t_traj = _run("gram_safe_esc", _transform(params, _random_ts("general")), targets)
    assert int(_lora_state(s1).n_skipped) == int(_lora_state(s2).n_skipped) > 0
    assert _max_rel_diff(t_traj, ref_traj) < 1e-9


_BASELINES = {
    "adamw": optax.adamw(LR, eps=1e-8, weight_decay=0.0),
    "scaled_adamw": lox.scaled_adamw(LR, weight_decay=0.0),
}


@pytest.mark.parametrize("name", list(_BASELINES))
def test_baselines_are_not_invariant(x64, name):
    params, targets, _ = _make_problem(1)
    tx = _BASELINES[name]
    _, _, ref_traj = _run(tx, params, targets)
    _, _, t_traj = _run(tx, _transform(params, _random_ts("general")), targets)
    assert _max_rel_diff(t_traj, ref_traj) > 1e-2


@pytest.mark.parametrize("b_zero", [False, True], ids=["brand", "b0"])
@pytest.mark.parametrize(
    "first,second",
    [
        ("gram", "qr"),
        ("gram_safe_esc", "qr_safe_esc"),
        ("gram_safe_esc", "gram_safe_esc_unstacked"),
    ],
)
def test_routes_and_stacking_agree(x64, first, second, b_zero):
    """Gram route == QR route, and stack_pairs=True == False, over 20 steps."""
    params, targets, _ = _make_problem(2, b_zero=b_zero)
    p1, s1, _ = _run(first, params, targets)
    p2, s2, _ = _run(second, params, targets)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-11), p1, p2)
    s1, s2 = _lora_state(s1), _lora_state(s2)
    assert int(s1.n_skipped) == int(s2.n_skipped)
    np.testing.assert_allclose(float(s1.grad_norm), float(s2.grad_norm), rtol=1e-9)
    if CONFIGS[first][0] == CONFIGS[second][0]:  # same basis: the same state
        f1 = lox.lora_rite_factor_state(s1, p1, stack_pairs=CONFIGS[first][3])
        f2 = lox.lora_rite_factor_state(s2, p2, stack_pairs=CONFIGS[second][3])
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12), f1, f2)


@pytest.mark.parametrize("basis", ["gram", "qr"])
def test_b_zero_first_step(basis):
    """B = 0: A does not move at the first step, B gets a finite non-zero update
    (float32 and bfloat16 params in one tree)."""
    params, targets, _ = _make_problem(3, b_zero=True)
    tree = {
        "f32": jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params),
        "bf16": jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params),
    }
    targets = _to_jax(targets)
    tx = lox.lora_rite(0.01, basis=basis)

    @jax.jit
    def first_step(tree):
        grads = jax.grad(lambda t: _loss(t["f32"], targets, 1.0) + _loss(t["bf16"], targets, 1.0))(
            tree
        )
        return tx.update(grads, tx.init(tree), tree)

    updates, state = first_step(tree)
    for dtype in ("f32", "bf16"):
        for name, (_, _, _, ka, kb) in LAYOUT.items():
            assert updates[dtype][name][ka].dtype == tree[dtype][name][ka].dtype
            np.testing.assert_array_equal(np.asarray(updates[dtype][name][ka], np.float32), 0.0)
            ub = np.asarray(updates[dtype][name][kb], np.float32)
            assert np.all(np.isfinite(ub)) and np.any(ub != 0)
    _finite_tree(state)


def _finite_tree(tree):
    for leaf in jax.tree.leaves(tree):
        x = np.asarray(leaf, np.float64)
        assert np.all(np.isfinite(x)), x


@pytest.mark.parametrize("basis", ["gram", "qr"])
def test_degenerate_inputs_stay_finite(basis):
    """Rank-deficient factors, zero factors, zero gradients, bf16: finite everywhere."""
    a = np.random.default_rng(0).normal(size=(6, 3))
    a[:, 2] = a[:, 0]  # rank 2
    b = np.zeros((3, 5))
    b[0] = 1.0  # rank 1
    params = {
        "deficient": {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b)},
        "zero": {"lora_a": jnp.zeros((6, 3)), "lora_b": jnp.zeros((3, 5))},
        "half": {"lora_a": jnp.asarray(a, jnp.bfloat16), "lora_b": jnp.asarray(b, jnp.bfloat16)},
    }
    tx = lox.lora_rite(0.1, basis=basis, escape_mass=True)
    state = tx.init(params)
    step = jax.jit(tx.update)
    rng = np.random.default_rng(1)
    for i in range(4):
        if i == 1:
            grads = jax.tree.map(jnp.zeros_like, params)
        else:
            grads = jax.tree.map(
                lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.1, x.dtype), params
            )
        updates, state = step(grads, state, params)
        _finite_tree(updates)
        _finite_tree(state)
        params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(np.asarray(params["zero"]["lora_a"]), 0.0)


def test_nonfinite_gradient_is_skipped():
    params, targets, loss_scale = _make_problem(4)
    p = _to_jax(params)
    tx = lox.lora_rite(0.01, skip_threshold=0.0)  # even with the RMS test off
    state = tx.init(p)
    grads = jax.grad(_loss)(p, _to_jax(targets), loss_scale)
    grads["dense"]["lora_a"] = grads["dense"]["lora_a"].at[0, 0].set(jnp.inf)
    grads["q"]["w_lora_b"] = grads["q"]["w_lora_b"].at[0, 0, 0].set(jnp.nan)
    updates, state = jax.jit(tx.update)(grads, state, p)
    s = _lora_state(state)
    assert int(s.n_skipped) == 2
    assert np.isfinite(float(s.grad_norm))
    _finite_tree(updates)
    _finite_tree(s)
    # A dropped factor with zero moments does not move at the first step.
    np.testing.assert_array_equal(np.asarray(updates["dense"]["lora_a"]), 0.0)


def test_state_layout_and_counters():
    params, targets, _ = _make_problem(5)
    p = _to_jax(jax.tree.map(lambda x: np.asarray(x, np.float32), params))
    tx = lox.scale_by_lora_rite()
    sds = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), p)
    abstract = jax.eval_shape(tx.init, sds)
    state = tx.init(p)
    assert isinstance(state, lox.ScaleByLoRARiteState)
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    assert jax.tree.structure(tx.init(sds)) == jax.tree.structure(state)
    assert np.isnan(float(state.grad_norm)) and int(state.n_skipped) == 0
    # Same-shape pairs share a group: dense + dense2; then q, o, stacked (2 layers).
    groups = lox.lora_rite_groups(lox.find_lora_pairs(p), p)
    assert [[pair.name for pair in g] for g in groups] == [
        ["dense/lora_a", "dense2/lora_a"],
        ["o/w_lora_a"],
        ["q/w_lora_a"],
        ["stacked/lora_a"],
    ]
    assert len(state.groups) == 4
    sizes = sorted(g.mu_a.shape[0] for g in state.groups)
    assert sizes == [1, 1, 2, 2]  # o, q: 1; dense+dense2: 2; stacked: 2 layers
    for g in state.groups:
        n = g.mu_a.shape[0]
        assert g.v.shape == (2 * n, 3, 3) and g.rinv.shape == (2 * n, 3, 3)
        assert g.rho.shape == (2 * n,) and g.prev_b.shape == g.mu_b.shape
    fs = lox.lora_rite_factor_state(state, p)
    assert fs["q/w_lora_b"]["mu"].shape == (3, 2, 4)
    assert fs["o/w_lora_a"]["prev"].shape == (2, 4, 3)
    assert fs["stacked/lora_a"]["v"].shape == (2, 3, 3)
    assert fs["stacked/lora_b"]["rho"].shape == (2,)
    # lora_rite: leaves outside pairs get optax.adamw, in optax.partition's layout.
    other = lox.lora_rite(1e-3).init(p).inner_states["other"].inner_state[0]
    assert isinstance(other.mu["dense"]["lora_a"], optax.MaskedNode)
    assert other.nu["bias"].shape == (4,)
    # QR route: no r×r R⁺ state.
    qr_state = lox.scale_by_lora_rite(basis="qr").init(p)
    assert all(isinstance(g.rinv, optax.MaskedNode) for g in qr_state.groups)
    grads = jax.grad(_loss)(p, _to_jax(targets), 100.0)  # large: every factor skipped
    _, state = jax.jit(tx.update)(grads, state, p)
    assert int(state.count) == 1
    assert int(state.n_skipped) == 2 * 6  # 5 pairs, one with 2 stacked layers
    assert float(state.grad_norm) == 0.0
    # A state built for another grouping is rejected.
    with pytest.raises(ValueError, match="groups"):
        lox.scale_by_lora_rite(stack_pairs=False).update(grads, state, p)


def test_other_leaves_get_adamw():
    params, targets, loss_scale = _make_problem(6)
    p = _to_jax(params)
    tx = lox.lora_rite(0.05, weight_decay=0.1)
    adamw = optax.adamw(0.05, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.1)
    s_rite, s_adam = tx.init(p), adamw.init(p["bias"])
    update = jax.jit(tx.update)
    for _ in range(3):
        grads = jax.grad(_loss)(p, _to_jax(targets), loss_scale)
        u_rite, s_rite = update(grads, s_rite, p)
        u_adam, s_adam = adamw.update(grads["bias"], s_adam, p["bias"])
        np.testing.assert_allclose(u_rite["bias"], u_adam, rtol=1e-6, atol=1e-7)
        p = optax.apply_updates(p, u_rite)


def test_bad_arguments():
    with pytest.raises(ValueError, match="basis"):
        lox.lora_rite(1e-3, basis="svd")
    with pytest.raises(ValueError, match="b1"):
        lox.lora_rite(1e-3, b1=1.0)
    with pytest.raises(ValueError, match="eps"):
        lox.scale_by_lora_rite(eps=-1.0)
    with pytest.raises(ValueError, match="clip_unmagnified_grad"):
        lox.lora_rite(1e-3, clip_unmagnified_grad=-1.0)
    with pytest.raises(ValueError, match="skip_threshold"):
        lox.lora_rite(1e-3, skip_threshold=float("nan"))
    with pytest.raises(ValueError, match="weight_decay"):
        lox.lora_rite(1e-3, weight_decay=-0.1)
    with pytest.raises(TypeError, match="escape_mass"):
        lox.lora_rite(1e-3, escape_mass=1)
    params = {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}
    tx = lox.lora_rite(1e-3)
    state = tx.init(params)
    with pytest.raises(ValueError, match="params"):
        tx.update(params, state)
    with pytest.raises(ValueError, match="no LoRA"):
        tx.init({"w": jnp.ones((3, 3))})
    with pytest.raises(ValueError, match="transposed"):
        tx.init({"lora_a": jnp.ones((2, 8)), "lora_b": jnp.ones((8, 2))})


_PROP_SHAPES = [  # (m, n, r, batch); few distinct shapes, so few compilations
    (5, 4, 2, ()),
    (3, 6, 3, (2,)),
    (1, 1, 1, ()),
]
_PROP_TX: dict = {}


def _prop_update(r, k):
    key = (r, k)
    if key not in _PROP_TX:
        pair = lox.LoRAPair("lora_a", "lora_b", r, batch_ndim=k)
        tx = lox.lora_rite(0.1, pairs=[pair])

        @jax.jit
        def first_step(params, grads):
            updates, state = tx.update(grads, tx.init(params), params)
            return updates, find_state(state, lox.ScaleByLoRARiteState)

        _PROP_TX[key] = first_step
    return _PROP_TX[key]


@settings(max_examples=12)
@given(
    shape=st.sampled_from(_PROP_SHAPES),
    b_scale=st.sampled_from([0.0, 1e-3, 1.0, 1e3]),
    g_scale=st.sampled_from([0.0, 1e-6, 1.0, 1e4]),
    rank_deficient=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_finite_and_invariant(shape, b_scale, g_scale, rank_deficient, seed):
    """Random magnitudes, rank-deficient factors: finite updates and state (float32),
    and the first step's update of A B is unchanged by a transformation T (float64)."""
    m, n, r, batch = shape
    rng = np.random.default_rng(seed)
    a = rng.normal(size=batch + (m, r))
    b = rng.normal(size=batch + (r, n)) * b_scale
    if rank_deficient and r > 1:
        a[..., -1] = a[..., 0]
    g_full = rng.normal(size=batch + (m, n)) * g_scale

    def grads_of(a, b):
        return {
            "lora_a": g_full @ np.swapaxes(b, -1, -2),
            "lora_b": np.swapaxes(a, -1, -2) @ g_full,
        }

    update = _prop_update(r, len(batch))
    p32 = {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}
    g32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads_of(a, b))
    u, s = update(p32, g32)
    _finite_tree(u)
    _finite_tree(s)
    if b_scale == 0.0:
        np.testing.assert_array_equal(np.asarray(u["lora_a"]), 0.0)

    well_posed = not rank_deficient or r == 1
    b_mats = b.reshape(-1, r, n)
    well_posed &= b_scale >= 1e-3 and max(np.linalg.cond(x @ x.T) for x in b_mats) < 1e6
    if not well_posed:  # the pseudo-inverse cut-off is not transformation invariant
        return
    with jax.enable_x64(True):
        t = np.linalg.qr(rng.normal(size=(r, r)))[0] @ np.diag(rng.uniform(0.5, 2.0, r))
        deltas = []
        for aa, bb in ((a, b), (a @ t, np.linalg.inv(t) @ b)):
            p = {"lora_a": jnp.asarray(aa), "lora_b": jnp.asarray(bb)}
            upd, _ = update(p, jax.tree.map(jnp.asarray, grads_of(aa, bb)))
            new = optax.apply_updates(p, upd)
            deltas.append(np.asarray(new["lora_a"] @ new["lora_b"] - p["lora_a"] @ p["lora_b"]))
        scale = np.abs(deltas[0]).max()
        np.testing.assert_allclose(deltas[1], deltas[0], atol=1e-7 * scale + 1e-12)


def test_factor_state_needs_exactly_one_lora_rite_state():
    params = {"lora_a": jnp.ones((6, 2)), "lora_b": jnp.ones((2, 5))}
    other = optax.adam(1e-3).init(params)  # no LoRA-RITE state at all
    with pytest.raises(ValueError, match=r"exactly one ScaleByLoRARiteState .* found 0"):
        lox.lora_rite_factor_state(other, params)
    rite = lox.scale_by_lora_rite().init(params)
    with pytest.raises(ValueError, match=r"found 2"):
        lox.lora_rite_factor_state((rite, rite), params)
