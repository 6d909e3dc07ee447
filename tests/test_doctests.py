"""The examples in the public docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import lora_optax


def _modules_with_examples() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(lora_optax.__path__, "lora_optax."):
        module = importlib.import_module(info.name)
        if any(test.examples for test in doctest.DocTestFinder().find(module)):
            names.append(info.name)
    return sorted(names)


MODULES = [
    name
    for name in _modules_with_examples()
    # The flax/model subpackages need the optional extras; their usage is covered by
    # the example scripts' tests.
    if name.startswith("lora_optax._src.")
]


def test_some_modules_have_examples():
    assert len(MODULES) >= 8, MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
