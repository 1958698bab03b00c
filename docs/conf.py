"""Sphinx configuration for pyro_jc."""

project = "pyro_jc"
author = "pyro_jc developers"
copyright = "2026, pyro_jc developers"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
intersphinx_mapping = {}  # no network at build time: cross-project links stay plain text
nitpicky = False
html_theme = "sphinx_rtd_theme"
exclude_patterns = ["_build"]
