"""MkDocs hooks of the docs site (``mkdocs.yml``, ``hooks:``).

The tutorial notebook links to the other pages as files (``recipes.md``, ``index.md#anchor``), so
that the links work where the notebook is opened (Jupyter, a repository browser). mkdocs rewrites
such links in Markdown pages only; mkdocs-jupyter hands over the notebook as HTML. This hook
rewrites them in the notebook's HTML to the pages' URLs, and a link to a file that is not a page
of the site is a warning (an error under ``mkdocs build --strict``), as for Markdown pages.
"""

from __future__ import annotations

import logging
import posixpath
import re
from typing import Any

logger = logging.getLogger("mkdocs.plugins.flowmc_hooks")

LINK_RE = re.compile(r'href="(?![a-z][a-z0-9+.-]*:|#|/)([^"#?]+\.(?:md|ipynb))(#[^"]*)?"')


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    """Rewrite the links of a notebook page to other pages; warn on a link to no page."""
    src = page.file.src_uri
    if not src.endswith(".ipynb"):
        return html

    def rewrite(m: re.Match) -> str:
        target = posixpath.normpath(posixpath.join(posixpath.dirname(src), m.group(1)))
        file = files.get_file_from_path(target)
        if file is None or not file.is_documentation_page():
            logger.warning(f"Doc file '{src}' contains a link '{m.group(1)}', but the target "
                           f"is not a page of the site")  # fmt: skip
            return m.group(0)
        return f'href="{file.url_relative_to(page.file)}{m.group(2) or ""}"'

    return LINK_RE.sub(rewrite, html)
