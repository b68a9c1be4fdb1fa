"""Sphinx configuration.

Build the site with warnings as errors (``.ci/run`` does)::

    pip install -e ".[docs]"
    python -m sphinx -W --keep-going -b html docs docs/_build/html

The example gallery runs the fast examples during the build (on
``../shared/data/cifar10_effnetlite0.h5`` when it is there, else on digits).
"""

import ltlearn

project = "ltlearn"
author = "ltlearn developers"
copyright = "2026, ltlearn developers"
release = version = ltlearn.__version__
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "auto_examples/*.ipynb", "auto_examples/*.py"]
templates_path = ["_templates"]

autosummary_generate = True
autodoc_default_options = {"members": True, "inherited-members": False}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False

html_theme = "pydata_sphinx_theme"
html_title = f"ltlearn {release}"
html_theme_options = {
    "navbar_align": "left",
    "show_toc_level": 2,
    "footer_start": ["copyright"],
}

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    # Run these during the build; the others need data or minutes (the test
    # suite runs them in their fast modes).
    "filename_pattern": r"/(quickstart|prl_preferences|calibration_reliability|cifar10_lt|grid_search)\.py$",
    "ignore_pattern": r"(__init__|_protocol)\.py",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "doc_module": ("ltlearn",),
    "backreferences_dir": "generated/backreferences",
}


def _skip_generated_members(app, what, name, obj, skip, options):
    # scikit-learn generates set_<method>_request for metadata routing on every
    # estimator; their docstrings point into scikit-learn's own documentation.
    if name.startswith("set_") and name.endswith("_request"):
        return True
    return skip


def setup(app):
    app.connect("autodoc-skip-member", _skip_generated_members)
