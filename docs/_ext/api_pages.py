"""API reference pages generated from each public module's ``__all__``.

At ``config-inited`` this writes ``api/<module>.rst`` for ``lora_optax``,
``lora_optax.flax``, ``lora_optax.models`` and ``lora_optax.tasks`` and for every
public submodule whose ``__all__`` holds names its package does not re-export. Each
name goes into an ``autosummary`` table (one page per name), grouped by the module that
defines it (section title: that module's docstring summary). At ``build-finished`` every
``__all__`` name must be a documented Python object, else a warning (an error under -W).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path
from types import ModuleType

from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)

PACKAGES = ("lora_optax", "lora_optax.flax", "lora_optax.models", "lora_optax.tasks")


def public_names(module: ModuleType) -> list[str]:
    return list(getattr(module, "__all__", ()))


def api_modules() -> dict[str, list[str]]:
    """``{module name: names to document there}``, packages first, then submodules."""
    pages: dict[str, list[str]] = {}
    for name in PACKAGES:
        package = importlib.import_module(name)
        pages[name] = public_names(package)
        exported = {id(getattr(package, n)) for n in pages[name]}
        for info in pkgutil.iter_modules(package.__path__, name + "."):
            leaf = info.name.rsplit(".", 1)[1]
            if leaf.startswith("_") or info.name in PACKAGES:
                continue
            sub = importlib.import_module(info.name)
            own = [n for n in public_names(sub) if id(getattr(sub, n)) not in exported]
            if own or not hasattr(package, "__all__"):
                pages[info.name] = own
    return pages


def _summary(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().split("\n\n")[0].replace("\n", " ").strip()


def _group(module: ModuleType, names: list[str]) -> list[tuple[str, list[str]]]:
    """Names grouped by the module defining them (constants in their own group)."""
    groups: dict[str, list[str]] = {}
    for n in names:
        obj = getattr(module, n)
        where = getattr(obj, "__module__", None) if callable(obj) else None
        groups.setdefault(where or "", []).append(n)
    out = []
    for where, members in groups.items():
        if where in ("", module.__name__):
            title = "Constants" if where == "" else "Members"
        else:
            title = _summary(importlib.import_module(where)).rstrip(".") or where
        out.append((title, members))
    return out


def _rst(module_name: str, names: list[str], children: list[str]) -> str:
    module = importlib.import_module(module_name)
    title = f"``{module_name}``"
    lines = [title, "=" * len(title), "", f".. automodule:: {module_name}", "    :no-members:", ""]
    if children:
        lines += [".. toctree::", "   :maxdepth: 1", ""]
        lines += [f"   {c}" for c in children]
        lines.append("")
    seen: set[str] = set()
    for title, members in _group(module, names):
        heading = title if title not in seen else f"{title} ({len(seen)})"
        seen.add(title)
        lines += [heading, "-" * len(heading), "", f".. currentmodule:: {module_name}", ""]
        lines += [".. autosummary::", "   :toctree: generated", "   :nosignatures:", ""]
        lines += [f"   {n}" for n in members]
        lines.append("")
    return "\n".join(lines)


def write_pages(app: Sphinx) -> None:
    out = Path(app.srcdir) / "api"
    out.mkdir(exist_ok=True)
    pages = api_modules()
    index = [
        "API reference",
        "=============",
        "",
        "Every name in the ``__all__`` of the public modules.",
        "",
        ".. toctree::",
        "   :maxdepth: 2",
        "",
    ]
    for name, names in pages.items():
        children = [c for c in pages if c.rsplit(".", 1)[0] == name and c != name]
        text = _rst(name, names, children)
        path = out / f"{name}.rst"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        if name in PACKAGES:
            index.append(f"   {name}")
    text = "\n".join(index) + "\n"
    if not (out / "index.rst").exists() or (out / "index.rst").read_text() != text:
        (out / "index.rst").write_text(text)


def check_documented(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None:
        return
    objects = app.env.get_domain("py").objects
    missing = [
        f"{module}.{n}"
        for module, names in api_modules().items()
        for n in names
        if f"{module}.{n}" not in objects
    ]
    for full in missing:
        logger.warning("public name %s is not documented in the API reference", full)


def setup(app: Sphinx) -> dict:
    # config-inited: before Sphinx lists the source files that autosummary scans
    app.connect("config-inited", lambda app, config: write_pages(app))
    app.connect("build-finished", check_documented)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
