"""Sphinx configuration: ``pip install -e ".[docs]" && sphinx-build docs docs/_build``."""

import ltlearn

project = "ltlearn"
release = ltlearn.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.autosummary", "numpydoc", "myst_parser"]
source_suffix = {".md": "markdown"}
numpydoc_show_class_members = False
exclude_patterns = ["_build"]
