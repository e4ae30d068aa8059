"""Token-aware recursive splitting that keeps paragraphs and sentences whole
(English and Chinese), plus the three document forms.

LangChain's RecursiveCharacterTextSplitter does the recursion and merging; we
give it the model's own token counter as its length function, so max_tokens
means tokens, and sentence separators for both scripts.

Every chunk is capped by characters too (``CHARS_PER_TOKEN`` per token): the
tokenizer maps an over-long word to one unknown token, so three 300,000-character
words would otherwise be one 900,002-character chunk of "3 tokens"."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from langchain_text_splitters import RecursiveCharacterTextSplitter

from domain.cleaning import clean_text
from domain.errors import DocumentError, SplitRuleError
from domain.events import DocForm, ProcessRule, max_overlap
from domain.ports import TokenCounter
from domain.segments import ChunkText

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

# A chunk holds at most max_tokens * CHARS_PER_TOKEN characters. Real text stays far
# below: the Python documentation's chunks average 3.9 characters per model token and
# never exceed 6.2, so the cap only cuts what the tokenizer cannot see (over-long words).
CHARS_PER_TOKEN = 8


@runtime_checkable
class BatchTokenCounter(Protocol):
    """A token counter that also counts many texts in one call (the model's fast
    tokenizer does it in parallel, outside the GIL)."""

    def count_tokens(self, text: str) -> int: ...

    def count_tokens_batch(self, texts: Sequence[str]) -> list[int]: ...


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
    if overlap > max_overlap(max_tokens):
        raise SplitRuleError(
            f"chunk_overlap {overlap} is more than half of max_tokens {max_tokens} "
            f"(at most {max_overlap(max_tokens)}): so much repeated text multiplies the "
            "segments; lower chunk_overlap"
        )
    # validated when the event was decoded ("\\n\\n" typed in JSON or a shell)
    separator = None if automatic else rule.decoded_separator
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
    max_segments: int | None = None,
) -> list[ChunkText]:
    """Clean and split one document's text into chunks ready for build_segments;
    more than ``max_segments`` chunks is a SplitRuleError (every one is embedded,
    stored and indexed twice)."""
    settings = resolve_rule(rule, model_max_tokens)
    cleaned = clean_text(text, rule)
    if not cleaned:
        raise DocumentError("the document has no text left after cleaning")
    counter = _Counter(tokens)
    if doc_form is DocForm.QA:
        chunks = _qa_chunks(cleaned, counter, settings)
    elif doc_form is DocForm.PARENT_CHILD:
        chunks = _parent_child_chunks(cleaned, counter, settings)
    else:
        chunks = [
            ChunkText(content=c, tokens=n)
            for piece in _pieces(cleaned, settings)
            for c, n in _split(piece, counter, settings.max_tokens, settings.chunk_overlap)
        ]
    if max_segments is not None and len(chunks) > max_segments:
        raise SplitRuleError(
            f"splitting would make {len(chunks)} segments of at most {settings.max_tokens} "
            f"tokens (overlap {settings.chunk_overlap}), above the limit of {max_segments} "
            "per document (KBSTREAM_MAX_SEGMENTS_PER_DOCUMENT); raise max_tokens or lower "
            "chunk_overlap, or split the file into smaller documents"
        )
    return chunks


def _pieces(text: str, settings: SplitSettings) -> list[str]:
    """A custom separator is a hard boundary: chunks never span it, and the
    separator itself is not content."""
    if not settings.separator:
        return [text]
    return [p for p in (part.strip() for part in text.split(settings.separator)) if p]


class _Counter:
    """Token counts of one document's pieces. The recursive splitter asks for a
    piece's length several times (to choose, to merge, to slide the overlap) and
    at every level; each piece is tokenized once, and a piece so long that its
    characters alone put it over the limit is not tokenized at all."""

    def __init__(self, tokens: TokenCounter) -> None:
        self.tokens = tokens
        self.memo: dict[str, int] = {}
        self._batch = tokens.count_tokens_batch if isinstance(tokens, BatchTokenCounter) else None

    def count(self, text: str) -> int:
        n = self.memo.get(text)
        if n is None:
            n = self.memo[text] = self.tokens.count_tokens(text)
        return n

    def count_many(self, texts: Sequence[str]) -> list[int]:
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if len(todo) > 1 and self._batch is not None:
            self.memo.update(zip(todo, self._batch(todo), strict=True))
        for t in todo:
            self.count(t)
        return [self.memo[t] for t in texts]

    def length(self, size: int, by_chars: bool = False) -> Callable[[str], int]:
        """The splitter's length function for chunks of ``size`` tokens: a piece's
        tokens, unless its characters alone put it over the limit (then it is not
        tokenized at all). ``by_chars`` counts every piece as at least its characters
        / CHARS_PER_TOKEN, so that the merge, which adds up its parts' lengths, keeps
        the character cap too."""

        def length(text: str) -> int:
            chars = -(-len(text) // CHARS_PER_TOKEN)
            if chars >= size:
                return chars
            tokens = self.count(text)
            return max(tokens, chars) if by_chars else tokens

        return length


def _split(
    text: str, counter: _Counter, size: int, overlap: int, by_chars: bool = False
) -> list[tuple[str, int]]:
    """Chunks of at most ``size`` tokens and ``size * CHARS_PER_TOKEN`` characters,
    with their exact token counts."""
    if not by_chars and len(text) <= size * CHARS_PER_TOKEN:
        # a text that fits is one chunk: what the splitter would make of it (its
        # parts merge back whole), without tokenizing each part on the way
        whole = text.strip()
        n = counter.count(whole)
        if n <= size:
            return [(whole, n)] if whole else []
    chunks = _splitter(counter.length(size, by_chars), size, overlap).split_text(text)
    out: list[tuple[str, int]] = []
    for chunk, n in zip(chunks, counter.count_many(chunks), strict=True):
        if (n <= size and len(chunk) <= size * CHARS_PER_TOKEN) or len(chunk) <= 1:
            out.append((chunk, n))
        elif n > size or by_chars:
            # merged by the sum of its parts' counts, which WordPiece does not
            # promise inside a word: split this one again, finer
            smaller = max(1, min(size - 1, size * size // max(n, 1)))
            out.extend(_split(chunk, counter, smaller, 0, by_chars=True))
        else:  # merged from parts of many characters per token (indented code, say)
            out.extend(_split(chunk, counter, size, 0, by_chars=True))
    return out


def _splitter(
    length: Callable[[str], int], size: int, overlap: int
) -> RecursiveCharacterTextSplitter:
    return RecursiveCharacterTextSplitter(
        separators=list(DEFAULT_SEPARATORS),
        chunk_size=size,
        chunk_overlap=overlap,
        length_function=length,
        keep_separator="end",
        strip_whitespace=True,
    )


def _parent_child_chunks(text: str, counter: _Counter, settings: SplitSettings) -> list[ChunkText]:
    out: list[ChunkText] = []
    for piece in _pieces(text, settings):
        for parent, _ in _split(piece, counter, settings.parent_max_tokens, 0):
            for child, n in _split(parent, counter, settings.max_tokens, settings.chunk_overlap):
                out.append(ChunkText(content=child, parent=parent, tokens=n))
    return out


_QA_MARK = re.compile(
    r"^\s*(?P<kind>Q|A|Question|Answer|问|答|问题|答案)\s*[:：]\s*", re.IGNORECASE | re.MULTILINE
)


def _qa_chunks(text: str, counter: _Counter, settings: SplitSettings) -> list[ChunkText]:
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
    cap = settings.max_tokens * CHARS_PER_TOKEN
    for q, a in pairs:
        if len(q) > cap:
            raise DocumentError(
                f"question {q[:60]!r}... has {len(q)} characters, above the limit of {cap} "
                f"({CHARS_PER_TOKEN} per token)"
            )
        n = counter.count(q)
        if n > settings.max_tokens:
            raise DocumentError(
                f"question {q[:60]!r}... has {n} tokens, above the limit of {settings.max_tokens}"
            )
        out.append(ChunkText(content=q, answer=a, tokens=n))
    return out
