"""HTML and Markdown to plain text that keeps paragraph structure for the splitter.

HTML is read into lxml's own tree (libxml2's HTML parser): BeautifulSoup built its
tree from the same parser's events and gave the same text on every page of the
Python documentation, about eight times slower."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator

from lxml import etree
from lxml.etree import _Element
from markdown_it import MarkdownIt

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


def _is_element(node: _Element) -> bool:
    # Comments and processing instructions are nodes too; only their tail is page text.
    return isinstance(node.tag, str)


def _classes(el: _Element) -> list[str]:
    return (el.get("class") or "").split()


def _is_furniture(el: _Element) -> bool:
    tag = el.tag
    if tag in ("header", "footer"):
        # Inside an article, <header> holds the article's title: keep it. At page level
        # it is the site banner or footer.
        return not any(p.tag in _SECTIONING for p in el.iterancestors())
    if tag == "form":
        # ASP.NET WebForms wrap the whole page in one <form>; a form holding headings
        # or the main content is a wrapper, not a search or login box.
        return next(el.iter("main", "article", "h1", "h2", "h3"), None) is None
    if tag == "a" and "headerlink" in _classes(el):
        return True  # Sphinx's "¶" permalink after every heading
    if el.get("role", "").lower() in _DROPPED_ROLES:
        return True
    if el.get("hidden") is not None or el.get("aria-hidden", "").lower() == "true":
        return True
    return bool(_HIDDEN_STYLE.search(el.get("style", "")))


def _drop(el: _Element) -> None:
    """Remove an element and everything in it, keeping the text that follows it."""
    parent = el.getparent()
    if parent is None:
        return
    if el.tail:
        before = el.getprevious()
        if before is not None:
            before.tail = (before.tail or "") + el.tail
        else:
            parent.text = (parent.text or "") + el.tail
    parent.remove(el)


def _remove_furniture(root: _Element) -> None:
    # Top-down, so a removed subtree is never visited.
    stack = [root]
    while stack:
        for child in list(stack.pop()):
            if not _is_element(child):
                continue
            if (child.tag in _DROPPED_TAGS and child.tag != "form") or _is_furniture(child):
                _drop(child)
            else:
                stack.append(child)


def _walk(root: _Element) -> Iterator[str | _Element]:
    """The text and elements below ``root`` in document order: an element where it
    starts, then its text, its children, and each child's tail. Never recursive."""
    stack: list[str | _Element] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            yield node
            continue
        if node is not root:
            yield node
        if not _is_element(node):
            continue
        for child in reversed(node):
            if child.tail:
                stack.append(child.tail)
            stack.append(child)
        if node.text:
            stack.append(node.text)


def _has_text(el: _Element) -> bool:
    return any(isinstance(n, str) and n.strip() for n in _walk(el))


def _first(root: _Element, tag: str, test: Callable[[_Element], bool]) -> _Element | None:
    return next((el for el in root.iter(tag) if test(el)), None)


def _content_root(root: _Element) -> _Element:
    """The main content region when the page marks one, else <body>."""
    articles = list(itertools.islice(root.iter("article"), 2))
    candidates = [
        next(root.iter("main"), None),
        _first(root, "*", lambda el: el.get("role") == "main"),
        articles[0] if len(articles) == 1 else None,  # several articles: an index page
        _first(root, "div", lambda el: "body" in _classes(el)),  # Sphinx, Debian's *-doc
        _first(root, "div", lambda el: "document" in _classes(el)),
    ]
    for el in candidates:
        if el is not None and _has_text(el):
            return el
    return _body(root)


def _body(root: _Element) -> _Element:
    return next(root.iter("body"), root)


def _inline_text(el: _Element) -> str:
    parts: list[str] = []
    for node in _walk(el):
        if isinstance(node, str):
            parts.append(node)
        elif node.tag in _BLOCK_TAGS or node.tag in ("br", "tr"):
            parts.append(" ")
    return " ".join("".join(parts).split())


def _pre_text(el: _Element) -> str:
    parts: list[str] = []
    for node in _walk(el):
        if isinstance(node, str):
            parts.append(node)
        elif node.tag == "br":
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
        self.blocks: list[tuple[str, _Element | None]] = []
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

    def add(self, text: str, table: _Element | None = None) -> None:
        self.flush()
        if text.strip():
            self.blocks.append((text, table))

    def result(self) -> str:
        out: list[str] = []
        previous: _Element | None = None
        for text, table in self.blocks:
            if out:
                out.append("\n" if table is not None and table is previous else "\n\n")
            out.append(text)
            previous = table
        return "".join(out)


_LEAVE = object()  # marks the end of a block element in the render walk


def _render(root: _Element) -> str:
    blocks = _Blocks()
    # Iterative walk: deeply nested markup must not hit Python's recursion limit.
    stack: list[str | _Element | tuple[object, _Element]] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            blocks.text(node)
        elif isinstance(node, tuple):
            blocks.flush()
        elif not _is_element(node):
            continue  # a comment or processing instruction; its tail is on the stack
        elif node.tag == "br":
            blocks.br()
        elif node.tag == "pre":
            blocks.add(_pre_text(node))
        elif node.tag == "tr":
            cells = [c for c in node if c.tag in ("td", "th")]
            row = " | ".join(_inline_text(c) for c in cells) if cells else _inline_text(node)
            blocks.add(row, next(node.iterancestors("table"), None))
        else:
            if node.tag in _BLOCK_TAGS:
                blocks.flush()
                stack.append((_LEAVE, node))
            for child in reversed(node):
                if child.tail:
                    stack.append(child.tail)
                stack.append(child)
            if node.text:
                stack.append(node.text)
    blocks.flush()
    return blocks.result()


# Browsers ignore these end tags: whatever follows is still body content. libxml2's
# tree builder drops elements that come after </html> when no <body> was open.
_DOCUMENT_END = re.compile(r"</(?:body|html)\s*>", re.IGNORECASE)


def _parse(html: str) -> _Element | None:
    """libxml2's HTML parser (BeautifulSoup's "lxml" builder reads the same parser's
    events). Its tree builder stops at 2,048 levels of nesting and drops what is
    deeper; such a page is built again from the parser's events, which have no
    depth limit."""
    data = _DOCUMENT_END.sub("", html).encode("utf-8", "replace")
    parser = etree.HTMLParser(encoding="utf-8", huge_tree=True)
    root = etree.fromstring(data, parser) if data.strip() else None
    if any(e.level_name == "FATAL" for e in parser.error_log):
        events = etree.HTMLParser(encoding="utf-8", target=etree.TreeBuilder())
        events.feed(data)
        root = events.close()
    return root


def html_to_text(html: str, *, main_region: bool = True) -> str:
    """Visible text of an HTML document, one block per paragraph, heading, item or row."""
    root = _parse(html)
    if root is None:
        return ""
    _remove_furniture(root)
    return _render(_content_root(root) if main_region else _body(root))


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
