"""HTML and Markdown to plain text that keeps paragraph structure for the splitter."""

from __future__ import annotations

import re
import warnings
from typing import TypeGuard

from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning, XMLParsedAsHTMLWarning
from bs4.element import NavigableString, PageElement, PreformattedString, Tag
from markdown_it import MarkdownIt

# A document that happens to look like a URL or like XML is still a document to us;
# these warnings would only add noise to consumer logs.
warnings.filterwarnings("ignore", category=MarkupResemblesLocatorWarning)
warnings.filterwarnings("ignore", category=XMLParsedAsHTMLWarning)

# Page furniture, not content.
_DROPPED_TAGS = (
    "script",
    "style",
    "noscript",
    "nav",
    "aside",
    "form",
    "template",
    "iframe",
    "svg",
    "canvas",
    "object",
    "embed",
    "select",
    "button",
)
_DROPPED_ROLES = {"navigation", "banner", "contentinfo", "complementary", "search"}
_SECTIONING = {"article", "main", "section"}
_HIDDEN_STYLE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden", re.IGNORECASE)

_BLOCK_TAGS = frozenset(
    {
        "address",
        "article",
        "blockquote",
        "body",
        "caption",
        "center",
        "dd",
        "details",
        "dialog",
        "div",
        "dl",
        "dt",
        "fieldset",
        "figcaption",
        "figure",
        "footer",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "header",
        "hgroup",
        "hr",
        "html",
        "legend",
        "li",
        "main",
        "ol",
        "p",
        "section",
        "summary",
        "table",
        "tbody",
        "td",
        "tfoot",
        "th",
        "thead",
        "ul",
    }
)

_WHITESPACE = re.compile(r"\s+")
_BR = object()  # marks a <br> in the inline buffer; "\n" in source text is only whitespace

_markdown = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])


def _is_text(node: PageElement) -> TypeGuard[NavigableString]:
    # Comments, doctypes, CDATA and processing instructions are not visible text.
    return isinstance(node, NavigableString) and not isinstance(node, PreformattedString)


def _is_furniture(tag: Tag) -> bool:
    if tag.name in ("header", "footer"):
        # Inside an article, <header> holds the article's title: keep it. At page level
        # it is the site banner or footer.
        return not any(p.name in _SECTIONING for p in tag.parents)
    if tag.name == "form":
        # ASP.NET WebForms wrap the whole page in one <form>; a form holding headings
        # or the main content is a wrapper, not a search or login box.
        return tag.find(["main", "article", "h1", "h2", "h3"]) is None
    if tag.name == "a" and "headerlink" in (tag.get("class") or []):
        return True  # Sphinx's "¶" permalink after every heading
    if str(tag.get("role", "")).lower() in _DROPPED_ROLES:
        return True
    if tag.has_attr("hidden") or str(tag.get("aria-hidden", "")).lower() == "true":
        return True
    return bool(_HIDDEN_STYLE.search(str(tag.get("style", ""))))


def _remove_furniture(soup: BeautifulSoup) -> None:
    # Top-down, so a removed subtree is never visited (and Tag.decomposed cannot be used:
    # bs4 turns that attribute lookup into a subtree search, quadratic on deep pages).
    stack: list[Tag] = [soup]
    while stack:
        for child in list(stack.pop().children):
            if not isinstance(child, Tag):
                continue
            if (child.name in _DROPPED_TAGS and child.name != "form") or _is_furniture(child):
                child.decompose()
            else:
                stack.append(child)


def _has_text(tag: Tag) -> bool:
    return any(_is_text(s) and s.strip() for s in tag.descendants)


def _content_root(soup: BeautifulSoup) -> Tag:
    """The main content region when the page marks one, else <body>."""
    articles = soup.find_all("article", limit=2)
    candidates = [
        soup.find("main"),
        soup.find(role="main"),
        articles[0] if len(articles) == 1 else None,  # several articles: an index page
        soup.find("div", class_="body"),  # Sphinx (Python docs, Debian's *-doc packages)
        soup.find("div", class_="document"),
    ]
    for tag in candidates:
        if isinstance(tag, Tag) and _has_text(tag):
            return tag
    return soup.body or soup


def _inline_text(tag: Tag) -> str:
    parts: list[str] = []
    for node in tag.descendants:
        if _is_text(node):
            parts.append(str(node))
        elif isinstance(node, Tag) and (node.name in _BLOCK_TAGS or node.name in ("br", "tr")):
            parts.append(" ")
    return " ".join("".join(parts).split())


def _pre_text(tag: Tag) -> str:
    parts: list[str] = []
    for node in tag.descendants:
        if _is_text(node):
            parts.append(str(node))
        elif isinstance(node, Tag) and node.name == "br":
            parts.append("\n")
    lines = [line.rstrip() for line in "".join(parts).replace("\r\n", "\n").split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


class _Blocks:
    """Collects blocks; blank line between blocks, one newline between rows of a table."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, Tag | None]] = []
        self.inline: list[str | object] = []

    def text(self, s: str) -> None:
        self.inline.append(_WHITESPACE.sub(" ", s))

    def br(self) -> None:
        self.inline.append(_BR)

    def flush(self) -> None:
        if not self.inline:
            return
        lines: list[str] = [""]
        for piece in self.inline:
            if piece is _BR:
                lines.append("")
            else:
                lines[-1] += str(piece)
        self.inline.clear()
        cleaned: list[str] = []
        for line in lines:
            line = " ".join(line.split())
            if line or (cleaned and cleaned[-1]):  # at most one blank line in a row
                cleaned.append(line)
        self.add("\n".join(cleaned).strip("\n"))

    def add(self, text: str, table: Tag | None = None) -> None:
        self.flush()
        if text.strip():
            self.blocks.append((text, table))

    def result(self) -> str:
        out: list[str] = []
        previous: Tag | None = None
        for text, table in self.blocks:
            if out:
                out.append("\n" if table is not None and table is previous else "\n\n")
            out.append(text)
            previous = table
        return "".join(out)


def _render(root: Tag) -> str:
    blocks = _Blocks()
    # Iterative walk: deeply nested markup must not hit Python's recursion limit.
    stack: list[tuple[PageElement, bool]] = [(root, False)]
    while stack:
        node, leaving = stack.pop()
        if leaving:
            blocks.flush()
        elif _is_text(node):
            blocks.text(str(node))
        elif isinstance(node, Tag):
            if node.name == "br":
                blocks.br()
            elif node.name == "pre":
                blocks.add(_pre_text(node))
            elif node.name == "tr":
                cells = node.find_all(["td", "th"], recursive=False)
                row = " | ".join(_inline_text(c) for c in cells) if cells else _inline_text(node)
                blocks.add(row, node.find_parent("table"))
            else:
                if node.name in _BLOCK_TAGS:
                    blocks.flush()
                    stack.append((node, True))
                stack.extend((child, False) for child in reversed(node.contents))
    blocks.flush()
    return blocks.result()


def html_to_text(html: str, *, main_region: bool = True) -> str:
    """Visible text of an HTML document, one block per paragraph, heading, item or row."""
    soup = BeautifulSoup(html, "lxml")
    _remove_furniture(soup)
    root = _content_root(soup) if main_region else (soup.body or soup)
    return _render(root)


def markdown_to_text(markdown: str) -> str:
    """Markdown rendered by a CommonMark parser, then read like HTML: headings,
    paragraphs, list items and code blocks come out as separate blocks, links as their text."""
    return html_to_text(_markdown.render(markdown), main_region=False)


_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)
_XML_ENCODING = re.compile(rb"""<\?xml[^>]+encoding\s*=\s*["']([A-Za-z0-9_.:-]+)""", re.I)


def declared_html_charset(data: bytes) -> str | None:
    """The charset a page declares in its first bytes (<meta> or XML declaration)."""
    head = data[:4096]
    match = _META_CHARSET.search(head) or _XML_ENCODING.search(head)
    return match.group(1).decode("ascii") if match else None
