"""Sphinx configuration: sphinx + MyST-NB + autodoc/autosummary/napoleon + MathJax, with
sphinx-book-theme (the optax documentation toolchain).

Build (warnings are errors)::

    sphinx-build -W -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))  # the checkout's lora_optax wins over an installed one

# The guides run on CPU (kernels inherit this environment); quiet TF/XLA logging.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(DOCS.parent), os.environ.get("PYTHONPATH", "")) if p
)

import lora_optax  # noqa: E402

project = "lora_optax"
author = "lora_optax maintainers"
copyright = "lora_optax maintainers"
release = lora_optax.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
    "api_pages",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb"}
exclude_patterns = ["_build", "jupyter_execute", "**.ipynb_checkpoints", "README.md"]
templates_path = ["_templates"]

# autodoc / autosummary / napoleon
autosummary_generate = True
autosummary_ignore_module_all = False
autodoc_typehints = "signature"
# optax's alias instead of its expansion (a float, an array or a schedule)
autodoc_type_aliases = {
    "base.ScalarOrSchedule": "optax.ScalarOrSchedule",
    "ScalarOrSchedule": "optax.ScalarOrSchedule",
}
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
add_module_names = False


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
    # NamedTuple fields only carry "Alias for field number N"; the class docstring
    # describes them.
    doc = getattr(obj, "__doc__", None) or ""
    if doc.startswith("Alias for field number"):
        return True
    return None


# MyST / MyST-NB: the guides are executed on every build; an error fails it.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_timeout = 300
nb_merge_streams = False
nb_output_stderr = "remove"  # progress bars and library warnings stay out of the pages
nb_render_markdown_format = "myst"  # tables in Markdown outputs

# HTML
html_theme = "sphinx_book_theme"
html_title = f"lora_optax {release}"
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
}
html_static_path: list[str] = []


def _drop_type_docstring(app, what, name, obj, options, lines):
    # A module constant without its own docstring would show its type's (dict, str, ...);
    # its page shows the value instead.
    if (
        what in ("data", "attribute")
        and type(obj).__doc__
        and "\n".join(lines).strip() == (type(obj).__doc__ or "").strip()
    ):
        lines.clear()


def setup(app):
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
    app.connect("autodoc-process-docstring", _drop_type_docstring)
