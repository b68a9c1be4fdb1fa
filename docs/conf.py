"""Sphinx configuration.

Build the site with warnings as errors (``.ci/run`` does)::

    pip install -e ".[docs]"
    python -m sphinx -W --keep-going -b html docs docs/_build/html

The example gallery runs the examples during the build: on the CIFAR-10 feature
file ``../shared/data/cifar10_effnetlite0.h5`` when it is there (the getting-started
page says how to make it), else on digits; the CIFAR-10-LT-from-images example only
when the CIFAR-10 JPEG zips are there too (it extracts 22,406 images, about two
minutes on 2 CPU cores). The CIFAR-100-LT example is shown, not run: its data cannot
be downloaded on the build machines. The figure of the benchmarks page is drawn
from that page's summary table (``plot_benchmark_summary.py``).
"""

import re
import runpy
import zlib
from pathlib import Path

import ltlearn

project = "ltlearn"
author = "ltlearn developers"
copyright = "2026, ltlearn developers"
release = version = ltlearn.__version__
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "auto_examples/*.ipynb", "auto_examples/*.py"]
templates_path = ["_templates"]

autosummary_generate = True
autodoc_default_options = {"members": True}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False

# Links into scikit-learn, NumPy, torch and h5py. Offline (the build machines) the remote
# inventories cannot be fetched: each falls back to an empty local one, which intersphinx
# reports as information, not a warning, so that -W builds still pass (names stay code).
_NO_INVENTORY = Path(__file__).resolve().parent / "_build" / "empty-objects.inv"
_NO_INVENTORY.parent.mkdir(exist_ok=True)
_NO_INVENTORY.write_bytes(
    b"# Sphinx inventory version 2\n# Project: none\n# Version: 0\n"
    b"# The remainder of this file is compressed using zlib.\n" + zlib.compress(b"")
)
intersphinx_mapping = {
    name: (url, (None, str(_NO_INVENTORY)))
    for name, url in {
        "sklearn": "https://scikit-learn.org/stable/",
        "numpy": "https://numpy.org/doc/stable/",
        "torch": "https://docs.pytorch.org/docs/stable/",
        "h5py": "https://docs.h5py.org/en/stable/",
        "python": "https://docs.python.org/3/",
    }.items()
}
intersphinx_timeout = 10

# Drawn from the summary table of benchmarks.md on every build, so that the figure cannot
# fall behind the table; a table it cannot read fails the build with a message.
runpy.run_path(str(Path(__file__).resolve().parent / "plot_benchmark_summary.py"))["plot_summary"]()

html_theme = "pydata_sphinx_theme"
html_title = f"ltlearn {release}"
html_static_path = ["_static"]
html_css_files = ["ltlearn.css", "details.css"]
html_theme_options = {
    "navbar_align": "left",
    "show_toc_level": 2,
    "footer_start": ["copyright"],
}
# Pages without sub-pages get no left sidebar: an empty "Section Navigation" column took
# a third of the width from their tables and code.
html_sidebars = {page: [] for page in ("index", "getting_started", "guide", "benchmarks")}
# Nor the example pages: beside it their code (up to 100 columns) ran under the right edge at
# 1,400 px; the gallery index and the previous/next links lead between examples.
html_sidebars["auto_examples/*"] = []
# Quotes and ellipses are typeset; "--" stays two hyphens (command-line options in prose).
smartquotes_action = "qe"

# Run these during the build; CIFAR-100-LT needs data these machines cannot download, and the
# test suite runs every example in a fast mode.
_RUN = [
    "quickstart",
    "prl_preferences",
    "calibration_reliability",
    "cifar10_lt",
    "grid_search",
    "long_tail_methods",
    "shifted_test_set",
    "features_out_of_core",
]
_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if all((_SHARED / f"cifar10-{split}-jpg.zip").exists() for split in ("train", "test")):
    _RUN.append("cifar10_lt_images")  # about two minutes, most of it extraction

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": rf"/({'|'.join(_RUN)})\.py$",
    "ignore_pattern": r"__init__\.py",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "doc_module": ("ltlearn",),
    "backreferences_dir": "generated/backreferences",
    # A cell's last value is shown (tables as HTML), but not the Axes or Legend a plotting
    # call returns.
    "ignore_repr_types": r"matplotlib",
}


def _skip_generated_members(app, what, name, obj, skip, options):
    # Metadata routing (get_metadata_routing, and the set_<method>_request methods that
    # scikit-learn generates on every estimator) is scikit-learn's plumbing, unchanged here:
    # the class pages list the methods a user calls (fit, predict, adapt, get_params, ...).
    if name == "get_metadata_routing" or (name.startswith("set_") and name.endswith("_request")):
        return True
    return skip


_SKLEARN_REF = re.compile(r":ref:`([^`<]+?)\s*<[^`>]+>`")


def _plain_sklearn_refs(app, what, name, obj, options, lines):
    # Methods inherited from scikit-learn (score, get_params, ...) cite labels of
    # scikit-learn's user guide, which this site does not have: keep their text.
    if getattr(obj, "__module__", "").startswith("sklearn"):
        lines[:] = [_SKLEARN_REF.sub(r"\1", line) for line in lines]


def setup(app):
    app.connect("autodoc-skip-member", _skip_generated_members)
    app.connect("autodoc-process-docstring", _plain_sklearn_refs)
