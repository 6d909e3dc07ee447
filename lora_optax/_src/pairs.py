"""LoRA pair model: which leaves of a pytree form (A, B) pairs, and how.

Every optimizer of the library receives ordinary pytrees. This module is the one
place that decides which leaves are LoRA factors, pairs them, and works out how each
factor maps to a matrix (see also the Notation page of the documentation):

* ``A`` has shape ``(*batch, *in_axes, r)`` and is read as a ``m × r`` matrix;
* ``B`` has shape ``(*batch, r, *out_axes)`` and is read as a ``r × n`` matrix;
* the low-rank update is ``ΔW = s · A B``.

Paths are tuples of strings (dict keys, attribute names and sequence indices all
become strings), so ``("layers", "0", "attn", "q", "lora_a")`` names the same leaf
whether the tree holds lists, dicts, flax ``nnx.State`` or dataclasses.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax

Path = tuple[str, ...]

# Leaf keys that wrap the array of a variable object (flax ``nnx.Variable`` flattens
# to its value under one of these keys); they are skipped when naming a leaf.
WRAPPER_KEYS = frozenset({"value", "raw_value"})

_QWIX_A = re.compile(r"^(?P<stem>.+)_lora_a$", re.IGNORECASE)
_QWIX_B = re.compile(r"^(?P<stem>.+)_lora_b$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class LoRAPair:
    """Where a LoRA pair lives in a pytree and how its factors map to matrices.

    ``A`` has shape ``(*batch, *in_axes, rank)`` and ``B`` has shape
    ``(*batch, rank, *out_axes)``; the layer adds ``scale · x A B``.

    Attributes:
      a_path: path of the down factor ``A`` (rank axis last).
      b_path: path of the up factor ``B`` (rank axis first after the batch axes).
      rank: the LoRA rank ``r``.
      batch_ndim: number of leading axes shared by ``A`` and ``B`` (stacked or
        scanned layers); every per-pair computation is batched over them.
      in_ndim: number of input axes of ``A`` (flattened to ``m``).
      out_ndim: number of output axes of ``B`` (flattened to ``n``).
      scale: the LoRA scale ``s`` (flax ``nnx.LoRA``: 1, qwix: ``alpha / r``,
        rsLoRA: ``alpha / sqrt(r)``). Methods that use full-weight gradients
        (LoRA-One, SoLoRA) need it; the others see it through the gradients.
    """

    a_path: Path
    b_path: Path
    rank: int
    batch_ndim: int = 0
    in_ndim: int = 1
    out_ndim: int = 1
    scale: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "a_path", as_path(self.a_path))
        object.__setattr__(self, "b_path", as_path(self.b_path))
        if self.rank < 1 or self.batch_ndim < 0 or self.in_ndim < 1 or self.out_ndim < 1:
            raise ValueError(
                f"Invalid LoRAPair for {path_str(self.a_path)}: rank={self.rank}, "
                f"batch_ndim={self.batch_ndim}, in_ndim={self.in_ndim}, "
                f"out_ndim={self.out_ndim} (rank, in_ndim, out_ndim must be >= 1)."
            )

    @property
    def name(self) -> str:
        """A readable name for messages: the A path."""
        return path_str(self.a_path)

    def a_shape_ok(self, shape: Sequence[int]) -> bool:
        return len(shape) == self.batch_ndim + self.in_ndim + 1 and shape[-1] == self.rank

    def b_shape_ok(self, shape: Sequence[int]) -> bool:
        return (
            len(shape) == self.batch_ndim + 1 + self.out_ndim
            and shape[self.batch_ndim] == self.rank
        )


# None (automatic discovery) | Sequence[LoRAPair] | Callable[[tree], Sequence[LoRAPair]]
# | a label tree mirroring the params with leaves "a" / "b" / None.
PairSpec = Any


def as_path(path: str | Iterable[Any]) -> Path:
    """Normalises a path given as ``"a/b/c"`` or a sequence of keys."""
    if isinstance(path, str):
        return tuple(p for p in path.split("/") if p)
    return tuple(str(p) for p in path)


def path_str(path: Path) -> str:
    return "/".join(path) if path else "<root>"


def _key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def key_path(keys: Iterable[Any]) -> Path:
    """The normalised path of a jax key path (dict keys, attributes, indices as strings)."""
    return tuple(_key_str(k) for k in keys)


def _is_array_like(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


class LeafIndex:
    """A flattened view of a pytree addressed by normalised paths.

    Only leaves that look like arrays (``shape`` and ``dtype``: arrays, tracers,
    ``jax.ShapeDtypeStruct``) are addressable; ``optax.MaskedNode`` holds no leaves,
    so masked-out parameters are simply absent.
    """

    def __init__(self, tree: Any):
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(tree)
        self.leaves = [leaf for _, leaf in flat]
        self.paths: list[Path] = [key_path(kp) for kp, _ in flat]
        self.index = {p: i for i, p in enumerate(self.paths)}

    def __contains__(self, path: Path) -> bool:
        return path in self.index

    def __getitem__(self, path: Path) -> Any:
        return self.leaves[self.index[path]]

    def items(self):
        return zip(self.paths, self.leaves)

    def replace(self, new: Mapping[Path, Any]) -> Any:
        """Rebuilds the tree with the leaves at the given paths replaced."""
        leaves = list(self.leaves)
        for path, value in new.items():
            leaves[self.index[path]] = value
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def map(self, fn: Callable[[Path, Any], Any]) -> Any:
        """Rebuilds the tree with ``fn(path, leaf)`` applied to every leaf."""
        return jax.tree_util.tree_unflatten(
            self.treedef, [fn(p, x) for p, x in zip(self.paths, self.leaves)]
        )


def _leaf_name(path: Path) -> tuple[Path, str]:
    """(parent path, name) of a leaf, looking through variable wrapper keys."""
    if len(path) >= 2 and path[-1] in WRAPPER_KEYS:
        return path[:-2], path[-2]
    return path[:-1], path[-1] if path else ""


def _role(parent: Path, name: str) -> tuple[str, Any] | None:
    """Classifies a leaf as ('a' | 'b', group key) by the ecosystem naming rules."""
    low = name.lower()
    if low in ("lora_a", "lora_b"):  # flax nnx.LoRA / LoRALinear, PEFT-like dicts
        return low[-1], (parent, "lora")
    m = _QWIX_A.match(name) or _QWIX_B.match(name)
    if m:  # qwix: <weight>_lora_a / <weight>_lora_b
        return low[-1], (parent, m.group("stem"))
    if parent and parent[-1].lower() == "lora" and low in ("a", "b"):  # gemma.peft
        return low, (parent, "")
    return None


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


def infer_geometry(
    a_shape: Sequence[int],
    b_shape: Sequence[int],
    *,
    batch_ndim: int | None = None,
    name: str = "<pair>",
) -> tuple[int, int, int, int]:
    """Works out ``(rank, batch_ndim, in_ndim, out_ndim)`` from the factor shapes.

    The rank is ``A``'s last axis, which must equal ``B``'s axis right after the
    batch axes. Axes that lead both shapes identically are read as batch axes
    (stacked layers): when several readings fit, the one with the most batch axes
    is taken, unless ``batch_ndim`` says otherwise. A reading whose rank exceeds
    the flattened in/out size is rejected: that is what a transposed (PEFT /
    PyTorch ``lora_A (r, in)``, ``lora_B (out, r)``) pair looks like.

    Raises:
      ValueError: naming the pair and both shapes, when no reading fits.
    """
    a_shape, b_shape = tuple(a_shape), tuple(b_shape)
    candidates = []
    max_k = min(len(a_shape) - 2, len(b_shape) - 2)
    for k in range(max_k, -1, -1):
        if batch_ndim is not None and k != batch_ndim:
            continue
        if a_shape[:k] != b_shape[:k] or a_shape[-1] != b_shape[k]:
            continue
        rank = a_shape[-1]
        m = _prod(a_shape[k:-1])
        n = _prod(b_shape[k + 1 :])
        if rank > m or rank > n:
            continue
        candidates.append((rank, k, len(a_shape) - k - 1, len(b_shape) - k - 1))
    if not candidates:
        hint = ""
        if len(a_shape) >= 2 and len(b_shape) >= 2 and a_shape[0] == b_shape[-1]:
            hint = (
                " The shapes look transposed (PEFT/PyTorch layout lora_A (r, in), "
                "lora_B (out, r)); lora_optax expects A (..., in, r) and B (..., r, out)."
            )
        extra = f" with batch_ndim={batch_ndim}" if batch_ndim is not None else ""
        raise ValueError(
            f"Cannot decide the orientation of LoRA pair {name}{extra}: A has shape "
            f"{a_shape} and B has shape {b_shape}. Expected A (*batch, *in, r) and "
            f"B (*batch, r, *out) with r <= in and r <= out.{hint} Pass an explicit "
            "LoRAPair (or batch_ndim=) if the shapes are correct."
        )
    return candidates[0]


def _prod(xs: Iterable[int]) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def _lookup(option: Any, path: Path, default: Any) -> Any:
    """Resolves a per-pair option given as a value, a mapping or a callable."""
    if option is None:
        return default
    if callable(option):
        return option(path)
    if isinstance(option, Mapping):
        key = path_str(path)
        for k, v in option.items():
            if as_path(k) == path or re.fullmatch(str(k), key):
                return v
        return default
    return option


def find_lora_pairs(
    tree: Any,
    *,
    batch_ndim: int | Mapping[str, int] | Callable[[Path], int | None] | None = None,
    scale: float | Mapping[str, float] | Callable[[Path], float] | None = None,
) -> tuple[LoRAPair, ...]:
    """Discovers the LoRA (A, B) pairs of a pytree by the ecosystem's naming rules.

    Recognised conventions (sibling leaves under the same parent):

    * flax ``nnx.LoRA`` / ``nnx.LoRALinear`` and plain dicts: ``lora_a`` / ``lora_b``
      (also inside ``nnx.State`` trees and ``nnx.Variable`` wrappers);
    * qwix (as used by tunix): ``<weight>_lora_a`` / ``<weight>_lora_b``, including
      multi-axis einsum shapes such as ``A (D, r)``, ``B (r, N, H)``;
    * gemma.peft: ``a`` / ``b`` under a node named ``lora``.

    Leaves may be arrays, tracers or ``jax.ShapeDtypeStruct``; only shapes are read.

    Args:
      tree: parameters (or gradients / abstract shapes) of the model.
      batch_ndim: number of leading stacked-layer axes, to override the automatic
        reading where shapes are ambiguous: an int for all pairs, a mapping from an
        A path (``"a/b/lora_a"``, or a regex over it) to an int, or a callable
        ``path -> int | None``.
      scale: the LoRA scale ``s`` of each pair (a float, mapping or callable of the
        A path, as for ``batch_ndim``); defaults to 1.

    Returns:
      The pairs, sorted by A path.

    Raises:
      ValueError: for a LoRA-named leaf without its partner, or a pair whose shapes
        do not form a LoRA pair (ranks disagree, orientation cannot be decided).
    """
    index = LeafIndex(tree)
    groups: dict[Any, dict[str, tuple[Path, Any]]] = {}
    for path, leaf in index.items():
        if not _is_array_like(leaf):
            continue
        parent, name = _leaf_name(path)
        role = _role(parent, name)
        if role is None:
            continue
        which, key = role
        slot = groups.setdefault(key, {})
        if which in slot:
            raise ValueError(
                f"Two LoRA '{which.upper()}' factors in the same group: "
                f"{path_str(slot[which][0])} and {path_str(path)}."
            )
        slot[which] = (path, leaf)
    pairs = []
    for slot in groups.values():
        if set(slot) != {"a", "b"}:
            ((which, (path, leaf)),) = slot.items()
            other = "B" if which == "a" else "A"
            raise ValueError(
                f"LoRA factor {path_str(path)} (shape {_shape(leaf)}) has no {other} "
                f"partner next to it. Every LoRA leaf must come with its sibling; if "
                "you split the tree with optax.partition/masked, keep A and B of a "
                "pair in the same partition."
            )
        (a_path, a), (b_path, b) = slot["a"], slot["b"]
        pairs.append(
            make_pair(
                a_path,
                b_path,
                _shape(a),
                _shape(b),
                batch_ndim=_lookup(batch_ndim, a_path, None),
                scale=float(_lookup(scale, a_path, 1.0)),
            )
        )
    return tuple(sorted(pairs, key=lambda p: p.a_path))


def make_pair(
    a_path: Path,
    b_path: Path,
    a_shape: Sequence[int],
    b_shape: Sequence[int],
    *,
    batch_ndim: int | None = None,
    scale: float = 1.0,
) -> LoRAPair:
    """Builds a :class:`LoRAPair` from factor shapes (see :func:`infer_geometry`)."""
    a_shape, b_shape = tuple(a_shape), tuple(b_shape)
    name = path_str(as_path(a_path))
    if a_shape[-1:] and b_shape and a_shape[-1] not in b_shape:
        raise ValueError(
            f"LoRA ranks disagree for pair {name}: A {a_shape} has rank "
            f"{a_shape[-1]} on its last axis, but B {b_shape} has no axis of that size."
        )
    rank, k, in_ndim, out_ndim = infer_geometry(a_shape, b_shape, batch_ndim=batch_ndim, name=name)
    return LoRAPair(a_path, b_path, rank, k, in_ndim, out_ndim, scale)


def _pairs_from_labels(labels: Any, tree: Any) -> tuple[LoRAPair, ...]:
    """Pairs from a label tree whose leaves are ``"a"``, ``"b"`` or ``None``."""
    label_index = LeafIndex(labels)
    index = LeafIndex(tree)
    groups: dict[Path, dict[str, Path]] = {}
    for path, label in label_index.items():
        if label is None:
            continue
        label = str(label).lower()
        if label not in ("a", "b"):
            raise ValueError(
                f"Pair label tree: leaf {path_str(path)} is {label!r}; expected 'a', 'b' or None."
            )
        if path not in index:
            raise ValueError(f"Pair label tree names {path_str(path)}, absent from the tree.")
        groups.setdefault(_leaf_name(path)[0], {})[label] = path
    pairs = []
    for parent, slot in groups.items():
        if set(slot) != {"a", "b"}:
            raise ValueError(
                f"Pair label tree: node {path_str(parent)} has labels {sorted(slot)}; each "
                "node holding a LoRA factor needs exactly one 'a' and one 'b' leaf."
            )
        pairs.append(
            make_pair(slot["a"], slot["b"], _shape(index[slot["a"]]), _shape(index[slot["b"]]))
        )
    return tuple(sorted(pairs, key=lambda p: p.a_path))


def resolve_pairs(
    spec: PairSpec, tree: Any, *, require: bool = True, what: str = "This transformation"
) -> tuple[LoRAPair, ...]:
    """Turns a user pair spec into validated pairs for ``tree``.

    Args:
      spec: ``None`` (automatic discovery with :func:`find_lora_pairs`), a sequence
        of :class:`LoRAPair`, a callable ``tree -> sequence of LoRAPair`` (e.g.
        ``functools.partial(find_lora_pairs, scale=2.0)``), or a label tree
        mirroring ``tree`` with leaves ``"a"`` / ``"b"`` / ``None``.
      tree: the tree the pairs must address (updates or params).
      require: raise when no pair is found.
      what: name of the caller, for messages.
    """
    if spec is None:
        pairs = find_lora_pairs(tree)
    elif callable(spec) and not isinstance(spec, LoRAPair):
        pairs = tuple(spec(tree))
    elif isinstance(spec, (list, tuple)) and all(isinstance(p, LoRAPair) for p in spec):
        pairs = tuple(spec)
    else:
        pairs = _pairs_from_labels(spec, tree)
    index = LeafIndex(tree)
    pairs = tuple(_rebase(pair, index) for pair in pairs)
    for pair in pairs:
        validate_pair(pair, index)
    # A tree with no array leaf at all (e.g. fully masked by optax.partition) is a no-op.
    if require and not pairs and any(_is_array_like(x) for x in index.leaves):
        shapes = ", ".join(
            f"{path_str(p)} {_shape(x)}" for p, x in list(index.items())[:6] if _is_array_like(x)
        )
        raise ValueError(
            f"{what} found no LoRA (A, B) pair in the tree (leaves: {shapes or 'none'}"
            f"{', ...' if len(index.leaves) > 6 else ''}). Name the factors by a "
            "supported convention (lora_a/lora_b, <w>_lora_a/<w>_lora_b, lora/{a,b}) "
            "or pass `pairs=` explicitly."
        )
    return pairs


def _rebase_path(path: Path, index: LeafIndex) -> Path:
    """The same leaf seen with or without a variable wrapper key (nnx ``.../value``).

    ``nnx.Optimizer`` initialises on variable-wrapped state but updates on pure arrays,
    so one explicit pair spec must address both forms of the tree.
    """
    if path in index:
        return path
    if path and path[-1] in WRAPPER_KEYS and path[:-1] in index:
        return path[:-1]
    for key in WRAPPER_KEYS:
        if (*path, key) in index:
            return (*path, key)
    return path


def _rebase(pair: LoRAPair, index: LeafIndex) -> LoRAPair:
    a_path, b_path = _rebase_path(pair.a_path, index), _rebase_path(pair.b_path, index)
    if (a_path, b_path) == (pair.a_path, pair.b_path):
        return pair
    return dataclasses.replace(pair, a_path=a_path, b_path=b_path)


def validate_pair(pair: LoRAPair, index: LeafIndex) -> None:
    """Checks that a pair's paths exist in the tree and its shapes fit its geometry."""
    for role, path in (("A", pair.a_path), ("B", pair.b_path)):
        if path not in index:
            raise ValueError(
                f"LoRA pair {pair.name}: its {role} path {path_str(path)} is not in the tree."
            )
    a_shape, b_shape = _shape(index[pair.a_path]), _shape(index[pair.b_path])
    if not pair.a_shape_ok(a_shape) or not pair.b_shape_ok(b_shape):
        raise ValueError(
            f"LoRA pair {pair.name}: A {a_shape} / B {b_shape} do not fit rank "
            f"{pair.rank}, batch_ndim {pair.batch_ndim}, in_ndim {pair.in_ndim}, "
            f"out_ndim {pair.out_ndim}."
        )
    k = pair.batch_ndim
    if a_shape[:k] != b_shape[:k]:
        raise ValueError(f"LoRA pair {pair.name}: batch axes differ, A {a_shape} vs B {b_shape}.")


def pair_roles(pairs: Sequence[LoRAPair]) -> dict[Path, tuple[str, LoRAPair]]:
    """Maps each factor path to ("a" | "b", its pair)."""
    out: dict[Path, tuple[str, LoRAPair]] = {}
    for p in pairs:
        out[p.a_path] = ("a", p)
        out[p.b_path] = ("b", p)
    return out


def label_tree(tree: Any, pairs: PairSpec = None, *, other: str = "other") -> Any:
    """Labels every leaf ``"lora_a"``, ``"lora_b"`` or ``other``, for ``optax.partition``.

    Example::

      labels = lora_optax.label_tree(params)
      labels = jax.tree.map(lambda l: "lora" if l.startswith("lora") else l, labels)
      tx = optax.partition({"lora": lora_optax.scaled_adamw(1e-3),
                            "other": optax.adamw(1e-4)}, labels)

    Both factors of a pair must go to the same transformation.
    """
    resolved = resolve_pairs(pairs, tree, require=False)
    roles = pair_roles(resolved)
    index = LeafIndex(tree)
    return index.map(lambda p, _: f"lora_{roles[p][0]}" if p in roles else other)


# ---------------------------------------------------------------------------------------
# Full-weight gradients (SoLoRA, LoRA-One): where a pair's G lives in a `full_grads` tree.
# ---------------------------------------------------------------------------------------


def pair_parent(pair: LoRAPair) -> Path:
    """Path of the node holding a pair's ``A`` and ``B`` (for discovered pairs, their
    common parent; in general the longest common prefix of the two parents)."""
    pa, pb = _leaf_name(pair.a_path)[0], _leaf_name(pair.b_path)[0]
    n = 0
    while n < min(len(pa), len(pb)) and pa[n] == pb[n]:
        n += 1
    return pa[:n]


def full_grad_paths(pair: LoRAPair) -> tuple[Path, ...]:
    """Where :func:`full_grad_for_pair` looks for a pair's ``G``, in order.

    First the pair's parent node (:func:`pair_parent`); for qwix-named factors
    ``<w>_lora_a`` also ``parent/<w>`` (the base weight's own position). Each path
    is also tried with a variable wrapper key (``value``) appended.
    """
    parent = pair_parent(pair)
    candidates = [parent]
    stem = _QWIX_A.match(_leaf_name(pair.a_path)[1])
    if stem:
        candidates.append(parent + (stem.group("stem"),))
    out: list[Path] = []
    for c in candidates:
        out.extend([c] + [c + (k,) for k in sorted(WRAPPER_KEYS)])
    return tuple(out)


def full_grad_shapes(
    pair: LoRAPair, a_shape: Sequence[int], b_shape: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(base-kernel shape ``(*batch, *in, *out)``, matrix shape ``(*batch, m, n)``)."""
    a_shape, b_shape = tuple(a_shape), tuple(b_shape)
    k = pair.batch_ndim
    kernel = a_shape[:-1] + b_shape[k + 1 :]
    matrix = a_shape[:k] + (_prod(a_shape[k:-1]), _prod(b_shape[k + 1 :]))
    return kernel, matrix


def full_grad_for_pair(
    pair: LoRAPair,
    full_grads: Any,
    params: Any,
    *,
    what: str = "This transformation",
) -> Any:
    """Fetches and checks the full-weight gradient ``G = ∂L/∂W`` of one pair.

    ``full_grads`` is a pytree laid out like the params tree with, at the position of
    each pair's PARENT node (the node holding its ``A`` and ``B``), that pair's ``G``:
    an array of the frozen base kernel's shape ``(*batch, *in_axes, *out_axes)`` (A's
    non-rank axes followed by B's non-rank axes) or of its matrix form
    ``(*batch, m, n)``. For qwix-named pairs (``<w>_lora_a``) ``G`` may also sit at
    ``parent/<w>``, the base weight's own position. A flat dict keyed by the parent
    path (``{"layers/0/attn/q": G}``) works too. :func:`lora_optax.zero_probes` and
    :func:`lora_optax.value_and_full_grads` build / return exactly this layout.

    Args:
      pair: the LoRA pair.
      full_grads: the tree (or a :class:`LeafIndex` of it).
      params: the params (or updates) tree, or a :class:`LeafIndex` of it, giving
        the shapes of ``A`` and ``B``.
      what: name of the caller, for messages.

    Returns:
      The array found, unchanged (kernel or matrix form; see
      ``linalg.full_grad_matrix`` to view it as ``(*batch, m, n)``).

    Raises:
      ValueError: when ``full_grads`` is None, holds nothing at the pair's position,
        or holds an array of another shape.
    """
    if full_grads is None:
        raise ValueError(
            f"{what} needs the full-weight gradients: call "
            "`update(updates, state, params, full_grads=...)` with a tree holding, at "
            "each LoRA pair's parent node, G = dL/dW of its frozen base weight (see "
            "lora_optax.value_and_full_grads)."
        )
    index = full_grads if isinstance(full_grads, LeafIndex) else LeafIndex(full_grads)
    pindex = params if isinstance(params, LeafIndex) else LeafIndex(params)
    kernel, matrix = full_grad_shapes(
        pair, _shape(pindex[pair.a_path]), _shape(pindex[pair.b_path])
    )
    flat_keys = {path_str(p): p for p in index.paths if len(p) == 1}
    found = None
    for path in full_grad_paths(pair):
        if path in index and _is_array_like(index[path]):
            found = (path, index[path])
            break
        key = path_str(path)
        if key in flat_keys and _is_array_like(index[flat_keys[key]]):
            found = (path, index[flat_keys[key]])
            break
    if found is None:
        where = " or ".join(f"full_grads[{path_str(p)!r}]" for p in full_grad_paths(pair)[:1])
        raise ValueError(
            f"{what}: no full-weight gradient for LoRA pair {pair.name} (A "
            f"{_shape(pindex[pair.a_path])}, B {_shape(pindex[pair.b_path])}). Expected an "
            f"array of shape {kernel} (or {matrix}) at {where}, the node holding the "
            "pair's A and B."
        )
    path, g = found
    if _shape(g) not in (kernel, matrix):
        raise ValueError(
            f"{what}: the full-weight gradient of LoRA pair {pair.name} at "
            f"{path_str(path)} has shape {_shape(g)}; expected the base kernel's shape "
            f"{kernel} (A's non-rank axes, then B's) or its matrix form {matrix}."
        )
    return g


# ---------------------------------------------------------------------------------------
# Argument validation shared by every transformation's ``update``.
# ---------------------------------------------------------------------------------------


def check_tree_match(
    updates: Any,
    params: Any,
    *,
    what: str = "This transformation",
    names: tuple[str, str] = ("updates", "params"),
) -> None:
    """Checks that ``updates`` and ``params`` have the same leaves with the same shapes.

    Runs on Python-level structure only (also under ``jit``, at trace time), so a
    gradient tree that does not match the parameters fails early with the first
    offending path instead of an opaque broadcasting or reshape error deep inside an
    update.

    Raises:
      ValueError: naming the first path present in one tree but not the other, or
        whose shapes differ.
    """
    u, p = LeafIndex(updates), LeafIndex(params)
    u_arrays = {path for path, x in u.items() if _is_array_like(x)}
    p_arrays = {path for path, x in p.items() if _is_array_like(x)}
    for missing, here, there in (
        (sorted(u_arrays - p_arrays), names[0], names[1]),
        (sorted(p_arrays - u_arrays), names[1], names[0]),
    ):
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(
                f"{what}: {here} has a leaf at {path_str(missing[0])}{more} that {there} "
                f"lacks; {names[0]} and {names[1]} must have the same tree structure."
            )
    for path in u.paths:
        if path in u_arrays and _shape(u[path]) != _shape(p[path]):
            raise ValueError(
                f"{what}: {names[0]} at {path_str(path)} has shape {_shape(u[path])} but "
                f"{names[1]} has shape {_shape(p[path])}."
            )
