"""The package version: the one place it is written (read by pyproject.toml and ``__init__``)."""

__version__ = "0.1.0"
