"""A self-contained HTML page: inline CSS, images beside it linked by relative paths (readable offline,
movable as a folder), and a check that every local link points to an existing file."""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from utils.io_utils import atomic_write

__all__ = ["Section", "figure", "local_links", "missing_links", "relative_link", "table", "write_page"]

_CSS = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1600px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccc; }
h3 { font-size: 15px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } td.l, th.l { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; }
figure { display: inline-block; margin: 6px; vertical-align: top; }
figcaption { font-size: 12px; color: #555; }
p.note { font-size: 13px; color: #555; }
"""


@dataclass
class Section:
    """A titled part of the page; ``body`` is HTML (escape text with :func:`html.escape`)."""

    title: str
    body: str


def relative_link(target: str | os.PathLike[str], page_dir: str | os.PathLike[str]) -> str:
    """``target``'s path relative to the page's folder, URL-quoted, with forward slashes."""
    rel = os.path.relpath(os.fspath(target), os.fspath(page_dir))
    return quote(Path(rel).as_posix())


def figure(target: Path, page_dir: Path, caption: str = "", *, width: int | None = None) -> str:
    """An image (linked to itself, at full size) with an optional caption."""
    src = relative_link(target, page_dir)
    w = f' width="{int(width)}"' if width else ""
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    alt = html.escape(caption or target.name)
    return f'<figure><a href="{src}"><img src="{src}" alt="{alt}"{w}></a>{cap}</figure>'


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, left: int = 1) -> str:
    """An HTML table; the first ``left`` columns are left-aligned (text), the others right-aligned."""

    def cell(tag: str, i: int, value: Any) -> str:
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{html.escape(str(value))}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_page(
    path: str | os.PathLike[str], title: str, sections: Sequence[Section], *, intro: str = ""
) -> Path:
    """Write the page (UTF-8) atomically."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if intro:
        parts.append(f'<p class="note">{intro}</p>')
    if len(sections) > 1:
        ids = [f"s{i}" for i in range(len(sections))]
        links = " · ".join(
            f'<a href="#{i}">{html.escape(s.title)}</a>' for i, s in zip(ids, sections, strict=True)
        )
        parts.append(f"<p>{links}</p>")
    for i, s in enumerate(sections):
        parts.append(f'<h2 id="s{i}">{html.escape(s.title)}</h2>\n{s.body}')
    parts.append("</body></html>\n")
    data = "\n".join(parts).encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.links.append(value)


def local_links(page: str | os.PathLike[str]) -> list[str]:
    """Every ``src`` / ``href`` of the page that points to a file (not ``#anchors``, not URLs)."""
    parser = _Links()
    parser.feed(Path(page).read_text(encoding="utf-8"))
    out = []
    for link in parser.links:
        parts = urlsplit(link)
        if parts.scheme or parts.netloc or not parts.path:
            continue
        out.append(unquote(parts.path))
    return out


def missing_links(page: str | os.PathLike[str]) -> list[str]:
    """Local links of the page whose file does not exist (relative to the page's folder), or that
    are absolute (the page would not survive being moved)."""
    folder = Path(page).parent
    return [link for link in local_links(page) if Path(link).is_absolute() or not (folder / link).is_file()]
