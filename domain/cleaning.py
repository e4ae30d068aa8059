"""Cleaning rules applied to extracted text before it is split."""

from __future__ import annotations

import re

from domain.events import ProcessRule

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffe\uffff]")
_INLINE_SPACE = re.compile(r"[ \t\u00a0\u2000-\u200b\u3000]+")
_SPACE_AROUND_NEWLINE = re.compile(r" *\n *")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
# ASCII URL characters only (a URL glued to Chinese text ends where the Chinese
# starts), and never ending on sentence punctuation.
_URL = re.compile(
    r"(?:(?:https?|ftp)://|www\.)[A-Za-z0-9\-._~:/?#\[\]@!$&*+,;=%]*[A-Za-z0-9\-_~/#@$&*+=%]"
)


def clean_text(text: str, rule: ProcessRule) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    if rule.remove_urls_emails:
        # e-mails first: an address is not a URL, but "www." inside one would match
        text = _EMAIL.sub("", text)
        text = _URL.sub("", text)
    if rule.remove_extra_whitespace:
        text = _INLINE_SPACE.sub(" ", text)
        text = _SPACE_AROUND_NEWLINE.sub("\n", text)
        text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()
