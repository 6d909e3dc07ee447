"""The API reference covers every public name: each ``__all__`` name of every public
module of ``lora_optax`` (``_src`` and other private modules aside) is on a page of the
docs' generated API reference, under its own module or a package that re-exports it.
The Sphinx build (``.ci/run``) then checks each of those names is a documented object."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx")
pytest.importorskip("flax")

import lora_optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "_ext"))
import api_pages


def _public_modules() -> list[str]:
    names = ["lora_optax"]
    for info in pkgutil.walk_packages(lora_optax.__path__, "lora_optax."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def test_every_public_name_is_on_an_api_page():
    pages = api_pages.api_modules()
    documented = {
        id(getattr(importlib.import_module(module), name)): f"{module}.{name}"
        for module, names in pages.items()
        for name in names
    }
    missing = []
    for module_name in _public_modules():
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            # re-exported objects are documented once, under the package
            if f"{module_name}.{name}" not in documented.values() and id(obj) not in documented:
                missing.append(f"{module_name}.{name}")
    assert not missing, missing
    assert {"lora_optax", "lora_optax.flax", "lora_optax.models", "lora_optax.tasks"} <= set(pages)
    assert "lora_optax.scaled_adamw" in documented.values()


def test_no_name_is_documented_twice():
    pages = api_pages.api_modules()
    seen: dict[int, str] = {}
    for module, names in pages.items():
        for name in names:
            obj = getattr(importlib.import_module(module), name)
            if isinstance(obj, str | int | float | tuple | frozenset):
                continue  # equal constants may be shared objects
            assert id(obj) not in seen, (f"{module}.{name}", seen.get(id(obj)))
            seen[id(obj)] = f"{module}.{name}"
