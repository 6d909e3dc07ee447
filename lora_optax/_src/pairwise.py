"""The pair-transformation kit every method of the library is built on (private).

A LoRA method is math on the matrix views of each pair: ``A`` is read as an ``m × r``
matrix (``(*batch, *in, r) -> (*batch, m, r)``), ``B`` as an ``r × n`` matrix
(``(*batch, r, *out) -> (*batch, r, n)``), ``ΔW = s·A B`` (see the Notation page of the
documentation). This module supplies everything around that math, once:

* **Resolution** (:func:`resolve_update`): the pairs are found and validated once per
  call, the updates and params are indexed by path, and an ``updates`` tree that does
  not match ``params`` fails with the first offending path.
* **Per-pair math** (:func:`map_pairs`, :func:`stateless_pair_transformation`): a
  function of ``(pair, PairMatrices)`` is applied to every pair and its results are
  written back in the factors' shapes and dtypes.
* **Groups** (:class:`PairGroup`, :func:`group_pairs`): pairs whose factors agree in
  shape, dtype, sharding and geometry, stacked on one leading axis, so that per-pair
  math runs once per group (``(N, m, r)`` / ``(N, r, n)``) instead of once per pair.
* **Per-pair state** (:func:`pair_state_tree`, :func:`pair_state_zeros`): state laid out
  like the params, with the pair's arrays at its factors' positions and
  ``optax.MaskedNode()`` replacing every other leaf (including its variable wrapper,
  as in the state of :func:`optax.masked`).
* **Leaves outside pairs** (:func:`lora_optimizer`): the one policy of the library.

Leaves outside pairs (biases, norms, a trained head): every optimizer alias of the
library (``scaled_adamw``, ``lora_rite``, ...) gives them its *base optimizer*, i.e.
:func:`optax.adamw` with the alias's own ``b1``, ``b2``, ``eps``, ``eps_root``,
``mu_dtype``, ``weight_decay`` and ``mask`` (or :func:`optax.sgd` for the ``*_sgd``
aliases), and gives the LoRA factors the method. Both go through
:func:`optax.partition`, so the state is optax's own ``PartitionState`` with the labels
``"lora"`` and ``"other"``, each a :class:`optax.MaskedState`. The building blocks
(``scale_by_*``, ``scale_lora_b``, ``add_imbalance_regularization``) pass leaves outside
pairs through unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_optax._src import base, linalg
from lora_optax._src.pairs import (
    WRAPPER_KEYS,
    LeafIndex,
    LoRAPair,
    PairSpec,
    Path,
    as_path,
    check_tree_match,
    full_grad_shapes,
    key_path,
    path_str,
    resolve_pairs,
)

LORA_LABEL = "lora"
OTHER_LABEL = "other"


def factor_paths(pairs: Sequence[LoRAPair]) -> frozenset[Path]:
    """The paths of every ``A`` and ``B`` of ``pairs``."""
    return frozenset(p for pair in pairs for p in (pair.a_path, pair.b_path))


# ---------------------------------------------------------------------------------------
# Resolution: pairs found and validated once per call, trees indexed by path.
# ---------------------------------------------------------------------------------------


class PairUpdate(NamedTuple):
    """What one ``update`` call of a pair transformation works on.

    Attributes:
      pairs: the validated pairs of ``updates``.
      updates: the incoming updates, indexed by path.
      params: the params indexed by path (``None`` when not needed and not given).
    """

    pairs: tuple[LoRAPair, ...]
    updates: LeafIndex
    params: LeafIndex | None


def resolve_update(
    spec: PairSpec, updates: Any, params: Any, what: str, *, needs_params: bool = True
) -> PairUpdate:
    """Resolves the pairs of ``updates`` and checks ``params`` against them.

    Raises:
      ValueError: when ``params`` is needed but missing, when ``updates`` and
        ``params`` differ in structure or shapes (naming the first path), or when a
        pair's factor is absent from ``params``.
    """
    resolved = resolve_pairs(spec, updates, what=what)
    if needs_params:
        base.require_params(params, what)
    if params is None:
        return PairUpdate(resolved, LeafIndex(updates), None)
    check_tree_match(updates, params, what=what)
    index = LeafIndex(params)
    for path in sorted(factor_paths(resolved)):
        if path not in index:
            raise ValueError(
                f"{what}: params has no leaf at {path_str(path)} although the updates "
                "do; params and updates must have the same structure."
            )
    return PairUpdate(resolved, LeafIndex(updates), index)


# ---------------------------------------------------------------------------------------
# Per-pair math on matrix views.
# ---------------------------------------------------------------------------------------


PairMatrices = linalg.PairMatrices
PairFn = Callable[[LoRAPair, PairMatrices], tuple[jax.Array, jax.Array]]


def pair_matrices(pair: LoRAPair, inputs: PairUpdate) -> PairMatrices:
    """The matrix views of one pair's updates and (when given) params."""
    u, p = inputs.updates, inputs.params
    return PairMatrices(
        linalg.a_matrix(pair, u[pair.a_path]),
        linalg.b_matrix(pair, u[pair.b_path]),
        None if p is None else linalg.a_matrix(pair, p[pair.a_path]),
        None if p is None else linalg.b_matrix(pair, p[pair.b_path]),
    )


def map_pairs(fn: PairFn, inputs: PairUpdate, *, stack: bool = False) -> dict[Path, Any]:
    """``fn(pair, matrices) -> (new g_A, new g_B)`` for every pair, in factor form.

    The results (matrix views, any float dtype) are reshaped to the factors' shapes and
    cast to the dtypes of the incoming updates. With ``stack=True`` the pairs of each
    :class:`PairGroup` are stacked on one leading axis and ``fn`` runs once per group
    (it then sees ``(N, m, r)`` / ``(N, r, n)`` matrices and the group's first pair,
    whose rank, scale and dtypes every pair of the group shares). On a CPU the
    concatenation and the split back cost more to compile than the per-pair kernels
    they replace for stateless methods, hence the default ``False``.

    Returns:
      ``{factor path: new update}`` for every factor.
    """
    out: dict[Path, Any] = {}
    u = inputs.updates
    index = inputs.params if inputs.params is not None else u
    for group in group_pairs(inputs.pairs, index, stack=stack):
        if len(group) == 1:
            pair = group.pair
            new_a, new_b = fn(pair, pair_matrices(pair, inputs))
            parts_a, parts_b = [new_a], [new_b]
        else:
            (g_a, unstack_a), (g_b, unstack_b) = group.stack(u, "a"), group.stack(u, "b")
            p = inputs.params
            a = None if p is None else group.stack(p, "a")[0]
            b = None if p is None else group.stack(p, "b")[0]
            new_a, new_b = fn(group.pair, PairMatrices(g_a, g_b, a, b))
            parts_a, parts_b = unstack_a(new_a), unstack_b(new_b)
        for pair, x_a, x_b in zip(group.pairs, parts_a, parts_b):
            out.update(factor_updates(pair, u, x_a, x_b))
    return out


def factor_updates(
    pair: LoRAPair, updates: LeafIndex, new_a: jax.Array, new_b: jax.Array
) -> dict[Path, jax.Array]:
    """A pair's new updates, from matrix views to the factors' shapes and the incoming
    updates' dtypes: ``{A path: new_a, B path: new_b}``."""
    g_a, g_b = updates[pair.a_path], updates[pair.b_path]
    return {
        pair.a_path: linalg.from_matrix(new_a, g_a.shape, pair).astype(g_a.dtype),
        pair.b_path: linalg.from_matrix(new_b, g_b.shape, pair).astype(g_b.dtype),
    }


def stateless_pair_transformation(
    fn: PairFn, *, pairs: PairSpec, what: str, needs_params: bool = True
) -> optax.GradientTransformationExtraArgs:
    """A stateless transformation replacing every pair's updates by ``fn``'s.

    Leaves outside pairs pass through unchanged; extra arguments are accepted and
    ignored.
    """

    def init_fn(params):
        resolve_pairs(pairs, params, what=what)
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        inputs = resolve_update(pairs, updates, params, what, needs_params=needs_params)
        return inputs.updates.replace(map_pairs(fn, inputs)), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def riemannian_preconditioner(
    *, delta: Any, pairs: PairSpec, what: str
) -> optax.GradientTransformationExtraArgs:
    """The Riemannian preconditioner (:func:`linalg.riemannian_precondition`) as a
    stateless pair transformation: shared by scaled GD/AdamW, πLoRA and LoRA-One."""
    base.check_non_negative(delta, "delta")
    return stateless_pair_transformation(
        lambda pair, m: linalg.riemannian_precondition(m, delta), pairs=pairs, what=what
    )


# ---------------------------------------------------------------------------------------
# The sequential order of the authors' code: A's whole step, then B's with the new A.
# ---------------------------------------------------------------------------------------


class SequentialRiemannianState(NamedTuple):
    """State of the sequential Riemannian-preconditioned step (``sequential=True``).

    Attributes:
      count: steps taken (the learning-rate schedule is evaluated at it).
      a: the direction's state on the ``A`` factors (an :class:`optax.MaskedState`
        laid out like the params, ``optax.MaskedNode()`` elsewhere).
      b: the same on the ``B`` factors.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    a: Any
    b: Any


def _role_mask(pairs: PairSpec, role: str, what: str) -> Callable[[Any], Any]:
    """``tree -> bool tree``: True at every pair's ``A`` (``role="a"``) or ``B`` node."""

    def mask(tree: Any) -> Any:
        found = resolve_pairs(pairs, tree, what=what)
        nodes = {_node_of(p.a_path if role == "a" else p.b_path) for p in found}
        return map_nodes(tree, lambda p: p in nodes)

    return mask


def _scaled(lr: Any, tree: Any) -> Any:
    """``-lr · x`` leaf-wise in each leaf's dtype (as :func:`optax.scale_by_learning_rate`)."""
    return jax.tree.map(lambda x: jnp.asarray(-lr, x.dtype) * x, tree)


def sequential_riemannian(
    learning_rate: base.ScalarOrSchedule,
    direction: optax.GradientTransformation,
    *,
    weight_decay: Any = 0.0,
    mask: Any = None,
    delta: Any = 1e-6,
    pairs: PairSpec,
    what: str,
) -> optax.GradientTransformationExtraArgs:
    """The Riemannian-preconditioned step in the order of the authors' code, whole.

    For every pair, with ``d(·)`` the ``direction`` (Adam's scaling, or the identity
    for scaled GD; its state kept separately for the ``A`` and the ``B`` factors) and
    ``η`` the learning rate at this transformation's step count:

    1. ``g̃_A = g_A (BBᵀ + δI)⁻¹`` with the current ``B``;
       ``A⁺ = (A − η d(g̃_A))(1 − η·wd)``: the step, then decoupled weight decay of the
       STEPPED factor;
    2. ``g̃_B = (A⁺ᵀA⁺ + δI)⁻¹ g_B`` with the updated ``A⁺`` (in the params' dtype);
       ``B⁺ = (B − η d(g̃_B))(1 − η·wd)``.

    The updates returned are ``A⁺ − A`` and ``B⁺ − B`` (the learning rate and the decay
    included, so nothing may follow but :func:`optax.apply_updates` or a transformation
    of finished updates); leaves outside pairs pass through unchanged. ``mask`` selects
    the decayed leaves as in :func:`optax.add_decayed_weights`.
    """
    base.check_learning_rate(learning_rate)
    base.check_non_negative(weight_decay, "weight_decay")
    base.check_non_negative(delta, "delta")
    dir_a = optax.masked(direction, _role_mask(pairs, "a", what))
    dir_b = optax.masked(direction, _role_mask(pairs, "b", what))
    decay = optax.add_decayed_weights(weight_decay, mask)

    def factor_step(tx: Any, grads: Any, state: Any, params: Any, lr: Any) -> tuple[Any, Any]:
        d, state = tx.update(grads, state, params)
        stepped = jax.tree.map(lambda p, x: (p - lr * x).astype(p.dtype), params, d)
        d, _ = decay.update(d, decay.init(params), stepped)
        return _scaled(lr, d), state

    def init_fn(params):
        resolve_pairs(pairs, params, what=what)
        return SequentialRiemannianState(
            count=jnp.zeros([], jnp.int32), a=dir_a.init(params), b=dir_b.init(params)
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        inputs = resolve_update(pairs, updates, params, what)
        lr = base.learning_rate_at(learning_rate, state.count)
        new = map_pairs(lambda _, m: (linalg.precondition_a(m, delta), m.g_b), inputs)
        u_a, state_a = factor_step(dir_a, inputs.updates.replace(new), state.a, params, lr)
        u_a_index = LeafIndex(u_a)
        assert inputs.params is not None
        p_index = inputs.params
        a_paths = [pair.a_path for pair in inputs.pairs]
        stepped_a = {
            path: (p_index[path] + u_a_index[path]).astype(p_index[path].dtype) for path in a_paths
        }
        params_a = p_index.replace(stepped_a)
        inputs_b = PairUpdate(inputs.pairs, inputs.updates, LeafIndex(params_a))
        new = map_pairs(lambda _, m: (m.g_a, linalg.precondition_b(m, delta)), inputs_b)
        u_b, state_b = factor_step(dir_b, inputs.updates.replace(new), state.b, params_a, lr)
        u_b_index = LeafIndex(u_b)
        out = {path: u_a_index[path] for path in a_paths}
        out.update({pair.b_path: u_b_index[pair.b_path] for pair in inputs.pairs})
        return inputs.updates.replace(out), SequentialRiemannianState(
            count=optax.safe_increment(state.count), a=state_a, b=state_b
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------
# Groups of same-shape pairs, stacked on one leading axis.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PairGroup:
    """Pairs whose factors agree in shape, dtype, sharding and geometry.

    Stacked on one leading axis (pairs in order, each pair's stacked layers row-major),
    they form ``N`` matrices ``(N, m, r)`` / ``(N, r, n)`` that per-pair math processes
    at once: one batched computation per layer shape instead of one per layer.
    """

    pairs: tuple[LoRAPair, ...]

    @property
    def pair(self) -> LoRAPair:
        """The first pair: its rank, scale and geometry are those of every pair."""
        return self.pairs[0]

    def __iter__(self) -> Iterator[LoRAPair]:
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def matrices(self, index: LeafIndex | Mapping[Path, Any], role: str) -> list[jax.Array]:
        """Each pair's ``A`` (``role="a"``) or ``B`` (``"b"``) matrix view in ``index``."""
        if role == "a":
            return [linalg.a_matrix(p, index[p.a_path]) for p in self.pairs]
        return [linalg.b_matrix(p, index[p.b_path]) for p in self.pairs]

    def stack(self, index: LeafIndex | Mapping[Path, Any], role: str) -> tuple[jax.Array, Any]:
        """The group's ``A`` or ``B`` matrices as one ``(N, m, r)`` / ``(N, r, n)``
        array, and ``unstack(y)`` giving back one matrix ``(*batch, ...)`` per pair
        (see :func:`lora_optax._src.linalg.stack_leading`)."""
        return linalg.stack_leading(self.matrices(index, role), 2)

    def paths(self, role: str) -> list[Path]:
        return [p.a_path if role == "a" else p.b_path for p in self.pairs]


def group_pairs(
    pairs: Sequence[LoRAPair], tree: Any, *, stack: bool = True
) -> tuple[PairGroup, ...]:
    """Groups pairs whose factors agree in shape, dtype, sharding and geometry.

    Order is kept (groups in order of first appearance, pairs in input order). With
    ``stack=False`` every pair is a group of its own.

    Args:
      pairs: the :class:`~lora_optax.LoRAPair` s.
      tree: the tree holding the factors (or a :class:`~lora_optax.LeafIndex` of it).
      stack: group same-shape pairs (``False``: one group per pair).
    """
    if not stack:
        return tuple(PairGroup((p,)) for p in pairs)
    index = tree if isinstance(tree, LeafIndex) else LeafIndex(tree)
    groups: dict[Any, list[LoRAPair]] = {}
    for p in pairs:
        a, b = index[p.a_path], index[p.b_path]
        key = (
            tuple(a.shape),
            tuple(b.shape),
            str(a.dtype),
            str(b.dtype),
            linalg.sharding_spec(a),
            linalg.sharding_spec(b),
            p.rank,
            p.batch_ndim,
            p.in_ndim,
            p.out_ndim,
            p.scale,
        )
        groups.setdefault(key, []).append(p)
    return tuple(PairGroup(tuple(g)) for g in groups.values())


# ---------------------------------------------------------------------------------------
# Per-pair state laid out like the params.
# ---------------------------------------------------------------------------------------


def is_variable(x: Any) -> bool:
    """A flax ``nnx.Variable`` (duck-typed, so that flax stays optional)."""
    return hasattr(x, "get_metadata") and hasattr(x, "get_value") and hasattr(x, "replace")


def _node_paths(tree: Any) -> tuple[list[Path], Any]:
    """Paths of the leaf NODES of ``tree`` (a variable wrapper counts as one node)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)
    return [key_path(kp) for kp, _ in flat], treedef


def _node_of(path: Path) -> Path:
    """The node path of a leaf path (without a trailing variable wrapper key)."""
    return path[:-1] if path and path[-1] in WRAPPER_KEYS else path


def map_nodes(tree: Any, fn: Callable[[Path], Any]) -> Any:
    """``tree`` with every leaf node (array or variable) replaced by ``fn(node path)``.

    Node paths never end in a variable wrapper key, so a leaf path ``.../lora_a/value``
    (an ``nnx.Variable``) and ``.../lora_a`` (its pure array) name the same node.
    """
    paths, treedef = _node_paths(tree)
    return jax.tree_util.tree_unflatten(treedef, [fn(p) for p in paths])


def pair_state_tree(tree: Any, values: Mapping[Path, Any]) -> Any:
    """A state tree laid out like ``tree``: ``values[path]`` at the given factor paths,
    ``optax.MaskedNode()`` replacing every other leaf node (a variable as a whole, as in
    :func:`optax.masked`'s state), so that tools mapping params metadata over the state
    (flax ``nnx.get_partition_spec``) find no wrapper around an array it does not
    describe."""
    by_node = {_node_of(as_path(p)): v for p, v in values.items()}
    return map_nodes(tree, lambda p: by_node.get(p, optax.MaskedNode()))


def _spec_or_none(x: Any) -> tuple[Any, ...]:
    spec = linalg.sharding_spec(x)
    return (None,) * len(x.shape) if spec is None else spec


def pair_state_zeros(pair: LoRAPair, a: Any, b: Any, dtype: Any, *, full: bool) -> Any:
    """Zeros for per-pair state, sharded consistently with the factors.

    ``full=False``: ``(v_in, v_out)`` of shapes ``(*batch, *in)`` and ``(*batch, *out)``
    (A's / B's layout without the rank axis). ``full=True``: one base-weight-sized
    array ``(*batch, *in, *out)`` laid out like the product ``A B`` (A's input axes,
    then B's output axes).
    """
    k = pair.batch_ndim
    sa, sb = _spec_or_none(a), _spec_or_none(b)
    sharded = linalg.sharding_spec(a) is not None or linalg.sharding_spec(b) is not None
    if full:
        kernel, _ = full_grad_shapes(pair, a.shape, b.shape)
        return linalg.zeros_with_spec(kernel, dtype, a, sa[:-1] + sb[k + 1 :] if sharded else None)
    v_in = linalg.zeros_with_spec(a.shape[:-1], dtype, a, sa[:-1] if sharded else None)
    v_out = linalg.zeros_with_spec(
        b.shape[:k] + b.shape[k + 1 :], dtype, b, sb[:k] + sb[k + 1 :] if sharded else None
    )
    return v_in, v_out


# ---------------------------------------------------------------------------------------
# Leaves outside pairs: the alias's base optimizer, through optax.partition.
# ---------------------------------------------------------------------------------------


def lora_optimizer(
    for_pairs: optax.GradientTransformation,
    base_optimizer: optax.GradientTransformation,
    *,
    pairs: PairSpec,
    what: str,
) -> optax.GradientTransformationExtraArgs:
    """``for_pairs`` on the LoRA factors, ``base_optimizer`` on every other leaf.

    The library's one policy for leaves outside pairs (see the module docstring). The
    state is :func:`optax.partition`'s (labels ``"lora"`` and ``"other"``, each an
    :class:`optax.MaskedState` whose masked-out nodes are ``optax.MaskedNode()``); the
    labels replace whole variable nodes, so the masked states of flax ``nnx`` params
    hold no wrapper around a ``MaskedNode``. Extra arguments (``full_grads=``) reach
    both transformations unmasked. ``update`` first checks that ``updates`` and
    ``params`` match (naming the first offending path).
    """

    def labels(tree: Any) -> Any:
        nodes = {_node_of(p) for p in factor_paths(resolve_pairs(pairs, tree, what=what))}
        return map_nodes(tree, lambda p: LORA_LABEL if p in nodes else OTHER_LABEL)

    tx = optax.partition({LORA_LABEL: for_pairs, OTHER_LABEL: base_optimizer}, labels)
    return with_input_checks(tx, what)


def with_input_checks(
    tx: optax.GradientTransformation, what: str
) -> optax.GradientTransformationExtraArgs:
    """``tx`` whose ``update`` first checks that ``updates`` and ``params`` match.

    So that a gradient tree that does not match the parameters fails with the
    offending path rather than a broadcasting error deep inside an update (or a
    structure error of optax's masking). The state is ``tx``'s own.
    """
    tx = optax.with_extra_args_support(tx)

    def update_fn(updates, state, params=None, **extra_args):
        if params is not None:
            check_tree_match(updates, params, what=what)
        return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def adamw_base(
    learning_rate: base.ScalarOrSchedule,
    b1: Any,
    b2: Any,
    eps: Any,
    eps_root: Any,
    mu_dtype: Any,
    weight_decay: Any,
    mask: Any,
) -> optax.GradientTransformationExtraArgs:
    """The base optimizer of the AdamW-type aliases, :func:`optax.adamw`, with the
    alias's hyperparameters checked eagerly (errors name the argument)."""
    check_adamw_hyperparams(learning_rate, b1, b2, eps, eps_root, weight_decay)
    return optax.adamw(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask)


def check_adamw_hyperparams(
    learning_rate: Any, b1: Any, b2: Any, eps: Any, eps_root: Any = 0.0, weight_decay: Any = 0.0
) -> None:
    """Eager checks of AdamW's hyperparameters (``learning_rate=None``: not checked)."""
    if learning_rate is not None:
        base.check_learning_rate(learning_rate)
    base.check_betas(b1=b1, b2=b2)
    base.check_non_negative(eps, "eps")
    base.check_non_negative(eps_root, "eps_root")
    base.check_non_negative(weight_decay, "weight_decay")


def decay_and_learning_rate(
    learning_rate: base.ScalarOrSchedule, weight_decay: Any, mask: Any
) -> optax.GradientTransformation:
    """Decoupled weight decay (multiplied by the learning rate) then ``-η``: what
    :func:`optax.adamw` puts after its scaling, for methods with their own direction."""
    base.check_learning_rate(learning_rate)
    base.check_non_negative(weight_decay, "weight_decay")
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
