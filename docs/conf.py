"""Sphinx configuration of deformcp's documentation site.

Build it from the repository root (``pip install ".[docs]"`` first)::

    sphinx-build -W --keep-going docs docs/_build/html

The Markdown pages are read by MyST, the API reference is generated from the numpydoc
docstrings (``api/index.md`` lists the modules it covers, in one place), the gallery is
sphinx-gallery's (sources in ``examples/``, run at build time on the CPU), and the
figures of the semantics are drawn at build time by ``figures/semantics_figures.py``
through matplotlib's ``plot`` directive, so that they follow the code.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

from sphinx.util import logging

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# Document the checkout being built (as pytest tests it), whatever deformcp is installed.
sys.path.insert(0, str(ROOT))

import deformcp  # noqa: E402

project = "deformcp"
author = "the deformcp developers"
copyright = "the deformcp developers"
version = release = deformcp.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "matplotlib.sphinxext.plot_directive",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]
templates_path = ["api/_templates"]

# --- MyST: the existing pages are plain Markdown with links between them ---------
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

# --- API reference -------------------------------------------------------------
autosummary_generate = True
# Members listed in a module's __all__ are its public names, imported ones included.
autosummary_ignore_module_all = False
autosummary_imported_members = True
autodoc_typehints = "none"  # numpydoc's Parameters sections say the types
autodoc_member_order = "bysource"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False

# --- Figures drawn at build time (plot directive) ----------------------------------
plot_include_source = False
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 120)]
plot_rcparams = {"savefig.bbox": "tight"}

# --- Gallery -------------------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",  # every example runs at build time
    "abort_on_example_error": True,
    "doc_module": ("deformcp",),
    "backreferences_dir": "api/generated/backreferences",
    "remove_config_comments": True,
    "download_all_examples": False,
    "matplotlib_animations": False,
    "min_reported_time": 1,
}

# --- HTML ------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"deformcp {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
html_show_sourcelink = False

_logger = logging.getLogger("deformcp.docs")


def _check_api_coverage(app, env):
    """Warn (an error under -W) for each name in a documented module's __all__ that the reference lacks."""
    domain = env.get_domain("py")
    documented = set(domain.objects)
    for modname in sorted(domain.modules):
        for name in getattr(importlib.import_module(modname), "__all__", ()):
            if f"{modname}.{name}" not in documented:
                _logger.warning("%s.%s is public (in __all__) but not in the API reference", modname, name,
                                type="deformcp", subtype="api_coverage")


def _no_type_docstring(app, what, name, obj, options, lines):
    """A module constant without a ``#:`` comment gets its type's docstring from autodoc (str's for
    ``__version__``, dict's for ``TOLERANCE``): show none rather than that."""
    type_doc = inspect.getdoc(type(obj))
    if what == "data" and type_doc and "\n".join(lines).strip() == type_doc.strip():
        lines.clear()


def _redraw_figures(app, env, added, changed, removed):
    """Re-read the figures page on every build: Sphinx does not see that its drawings depend on
    figures/semantics_figures.py and on deformcp, and the three figures take a second or two."""
    return ["figures/index"]


def setup(app):
    app.connect("env-get-outdated", _redraw_figures)
    # Before numpydoc (priority 500) rewrites the lines.
    app.connect("autodoc-process-docstring", _no_type_docstring, priority=400)
    app.connect("env-check-consistency", _check_api_coverage)
