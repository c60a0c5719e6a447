"""The version of calibops, written once: ``pyproject.toml`` reads it (``[tool.setuptools.dynamic]``), so the
package metadata, ``calibops.__version__`` and ``calibops --version`` always agree."""

__version__ = "0.3.0"
