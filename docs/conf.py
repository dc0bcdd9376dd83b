"""Sphinx configuration of the documentation site (``make docs``).

The pages are Markdown (MyST), so they read the same on GitHub. ``make docs`` builds them with
``-W --keep-going -n``: every warning fails the build, a link to a page or heading that does not
exist included. A relative link that leaves ``docs/`` (``../benchmarks/RESULTS.md``) is checked to
name a file or folder of the repository, and points at it on GitHub in the built site. The
README's relative links are checked too (files, pages and heading anchors). No external URL is
fetched: the build is offline.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx
from sphinx.util import logging

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
_VERSION = re.search(
    r'__version__\s*=\s*"([^"]+)"', (ROOT / "airflow_provider_kontext" / "__init__.py").read_text()
)
# The repository, as pyproject.toml's [project.urls] names it.
_SOURCE = re.search(r'^Source = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
REPO_URL = _SOURCE.group(1).rstrip("/") if _SOURCE else ""

project = "airflow-provider-kontext"
author = "airflow-provider-kontext developers"
copyright = "airflow-provider-kontext developers"
release = _VERSION.group(1) if _VERSION else ""
version = release

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
# GitHub-style anchors for headings down to ####, so `page.md#a-heading` works here and on GitHub.
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence"]
nitpicky = True

html_theme = "furo"
html_title = "airflow-provider-kontext"
html_static_path: list[str] = []
html_show_sourcelink = False

_LOG = logging.getLogger(__name__)
# A Markdown link whose target leaves docs/: `](../path)` or `](../path#anchor)`.
_OUTSIDE = re.compile(r"\]\((\.\./[^)\s#]*)(#[^)\s]*)?\)")


def _outside_links(app: Sphinx, docname: str, source: list[str]) -> None:
    """Point links to repository files outside docs/ at GitHub, after checking the file exists."""
    page = Path(app.env.doc2path(docname))
    text = source[0]

    def replace(match: re.Match[str]) -> str:
        where = (docname, text.count("\n", 0, match.start()) + 1)
        target = (page.parent / match.group(1)).resolve()
        try:
            rel = target.relative_to(ROOT)
        except ValueError:
            _LOG.warning("link leaves the repository: %s", match.group(1), location=where)
            return match.group(0)
        if not target.exists():
            _LOG.warning("link to a missing file: %s", match.group(1), location=where)
            return match.group(0)
        kind = "tree" if target.is_dir() else "blob"
        return f"]({REPO_URL}/{kind}/main/{rel.as_posix()}{match.group(2) or ''})"

    source[0] = _OUTSIDE.sub(replace, text)


# A relative Markdown link in the README: `](path)` or `](path#anchor)`, not a URL.
_README_LINK = re.compile(r"\]\((?![a-z]+:)([^)\s#]*)(#[^)\s]*)?\)")


def _check_readme(app: Sphinx, env: Any) -> None:
    """Check the README's relative links: files exist, and pages and headings of this site exist."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    for match in _README_LINK.finditer(text):
        path, anchor = match.group(1), (match.group(2) or "")[1:]
        where = f"{readme}:{text.count(chr(10), 0, match.start()) + 1}"
        if not path:
            _LOG.warning("README: a link within the README itself: %s", match.group(0), location=where)
            continue
        target = (ROOT / path).resolve()
        if not target.exists():
            _LOG.warning("README: link to a missing file: %s", path, location=where)
            continue
        if target.parent == DOCS and target.suffix == ".md":
            docname = target.stem
            if docname not in env.all_docs:
                _LOG.warning("README: %s is not a page of the site", path, location=where)
            elif anchor and anchor not in env.metadata[docname].get("myst_slugs", {}):
                _LOG.warning("README: no heading #%s in %s", anchor, path, location=where)


def setup(app: Sphinx) -> dict[str, Any]:
    """Register the checks of links that leave docs/, and of the README's links into it."""
    app.connect("source-read", _outside_links)
    app.connect("env-check-consistency", _check_readme)
    return {"parallel_read_safe": True}
