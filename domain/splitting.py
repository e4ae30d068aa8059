"""Token-aware recursive splitting that keeps paragraphs and sentences whole
(English and Chinese), plus the three document forms.

LangChain's RecursiveCharacterTextSplitter does the recursion and merging; we
give it the model's own token counter as its length function, so max_tokens
means tokens, and sentence separators for both scripts."""

from __future__ import annotations

import re
from dataclasses import dataclass

from langchain_text_splitters import RecursiveCharacterTextSplitter

from domain.cleaning import clean_text
from domain.errors import DocumentError, SplitRuleError
from domain.events import DocForm, ProcessRule
from domain.model import ChunkText
from domain.ports import TokenCounter

# Coarse to fine: paragraphs, lines, sentences (Chinese full-width and English),
# clauses, words, then characters as the last resort.
DEFAULT_SEPARATORS: tuple[str, ...] = (
    "\n\n",
    "\n",
    "。",
    "！",
    "？",
    ". ",
    "! ",
    "? ",
    "；",
    "; ",
    "，",
    ", ",
    " ",
    "",
)


@dataclass(frozen=True)
class SplitSettings:
    max_tokens: int
    chunk_overlap: int
    separator: str | None  # a custom hard boundary, dropped from the chunks
    parent_max_tokens: int
    remove_extra_whitespace: bool
    remove_urls_emails: bool


def resolve_rule(rule: ProcessRule, model_max_tokens: int) -> SplitSettings:
    """Turn a (possibly automatic) rule into concrete numbers for this model.

    A chunk longer than the model's input is silently truncated by the model,
    so asking for one is an error, not something to round down quietly."""
    automatic = rule.mode == "automatic"
    max_tokens = model_max_tokens if automatic or rule.max_tokens is None else rule.max_tokens
    if max_tokens > model_max_tokens:
        raise SplitRuleError(
            f"max_tokens {max_tokens} exceeds the embedding model's input limit of "
            f"{model_max_tokens} tokens; lower max_tokens in the process rule"
        )
    default_overlap = max_tokens // 10
    overlap = default_overlap if automatic or rule.chunk_overlap is None else rule.chunk_overlap
    if overlap >= max_tokens:
        raise SplitRuleError(f"chunk_overlap {overlap} must be below max_tokens {max_tokens}")
    separator = None
    if not automatic and rule.separator:
        separator = rule.separator
        if "\\" in separator and separator.isascii():  # "\\n\\n" typed in JSON or a shell
            separator = separator.encode().decode("unicode_escape")
    parent = rule.parent_max_tokens or max(max_tokens * 4, 512)
    return SplitSettings(
        max_tokens=max_tokens,
        chunk_overlap=overlap,
        separator=separator,
        parent_max_tokens=parent,
        remove_extra_whitespace=rule.remove_extra_whitespace,
        remove_urls_emails=rule.remove_urls_emails,
    )


def split_document(
    text: str,
    doc_form: DocForm,
    rule: ProcessRule,
    tokens: TokenCounter,
    model_max_tokens: int,
) -> list[ChunkText]:
    """Clean and split one document's text into chunks ready for build_segments."""
    settings = resolve_rule(rule, model_max_tokens)
    cleaned = clean_text(text, rule)
    if not cleaned:
        raise DocumentError("the document has no text left after cleaning")
    if doc_form is DocForm.QA:
        return _qa_chunks(cleaned, tokens, settings)
    if doc_form is DocForm.PARENT_CHILD:
        return _parent_child_chunks(cleaned, tokens, settings)
    splitter = _splitter(tokens, settings.max_tokens, settings.chunk_overlap)
    return [
        ChunkText(content=c, tokens=tokens.count_tokens(c))
        for piece in _pieces(cleaned, settings)
        for c in splitter.split_text(piece)
    ]


def _pieces(text: str, settings: SplitSettings) -> list[str]:
    """A custom separator is a hard boundary: chunks never span it, and the
    separator itself is not content."""
    if not settings.separator:
        return [text]
    return [p for p in (part.strip() for part in text.split(settings.separator)) if p]


def _splitter(tokens: TokenCounter, size: int, overlap: int) -> RecursiveCharacterTextSplitter:
    return RecursiveCharacterTextSplitter(
        separators=list(DEFAULT_SEPARATORS),
        chunk_size=size,
        chunk_overlap=overlap,
        length_function=tokens.count_tokens,
        keep_separator="end",
        strip_whitespace=True,
    )


def _parent_child_chunks(
    text: str, tokens: TokenCounter, settings: SplitSettings
) -> list[ChunkText]:
    parent_splitter = _splitter(tokens, settings.parent_max_tokens, 0)
    child_splitter = _splitter(tokens, settings.max_tokens, settings.chunk_overlap)
    out: list[ChunkText] = []
    for piece in _pieces(text, settings):
        for parent in parent_splitter.split_text(piece):
            for child in child_splitter.split_text(parent):
                out.append(
                    ChunkText(content=child, parent=parent, tokens=tokens.count_tokens(child))
                )
    return out


_QA_MARK = re.compile(
    r"^\s*(?P<kind>Q|A|Question|Answer|问|答|问题|答案)\s*[:：]\s*", re.IGNORECASE | re.MULTILINE
)


def _qa_chunks(text: str, tokens: TokenCounter, settings: SplitSettings) -> list[ChunkText]:
    """Q&A documents are written as ``Q: ...`` / ``A: ...`` blocks (or 问：/答：).
    The question is what gets embedded; it must fit the model."""
    # A marker only counts when it alternates (Q after A, A after Q): a line
    # like "a: red means error" inside an answer stays part of that answer.
    marks = []
    expect_question = True
    for mark in _QA_MARK.finditer(text):
        is_question = mark.group("kind").lower() in ("q", "question", "问", "问题")
        if is_question == expect_question:
            marks.append((mark, is_question))
            expect_question = not expect_question
    pairs: list[tuple[str, str]] = []
    question: str | None = None
    for i, (mark, is_question) in enumerate(marks):
        end = marks[i + 1][0].start() if i + 1 < len(marks) else len(text)
        body = text[mark.end() : end].strip()
        if is_question:
            question = body
        elif question is not None:
            pairs.append((question, body))
            question = None
    if not pairs:
        raise DocumentError(
            "no question/answer pairs found; a Q&A document needs lines starting "
            "with 'Q:' and 'A:' (or '问：' and '答：')"
        )
    out = []
    for q, a in pairs:
        n = tokens.count_tokens(q)
        if n > settings.max_tokens:
            raise DocumentError(
                f"question {q[:60]!r}... has {n} tokens, above the limit of {settings.max_tokens}"
            )
        out.append(ChunkText(content=q, answer=a, tokens=n))
    return out
