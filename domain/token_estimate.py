"""Token counts for a remote embedding model whose tokenizer is not on this machine.

The split stage must keep every chunk under the model's input limit, counted in the
model's own tokens. A remote model (an OpenAI-compatible service) ships no tokenizer,
so unless KBSTREAM_TOKENIZER names one, chunks are measured with this estimate, which
is meant to over-count byte-level BPE tokenizers (cl100k, o200k, Llama, XLM-R) and
WordPiece alike on real text:

- a run of ASCII letters or digits: one token per 3 characters, rounded up (English
  words average 1.3 BPE tokens for 4.7 letters; numbers go in groups of 3 digits);
- an ASCII punctuation mark or symbol: 1 (BPE merges some, never splits one);
- a run of whitespace: 0 if it is one space or tab (BPE glues it to the next word),
  else 1;
- a non-ASCII character: 1 below U+0800 (accented Latin, Greek, Cyrillic, Arabic),
  2 for CJK and Hangul, 3 for the rest of the BMP (its UTF-8 bytes: the most a
  byte-level BPE can make of it, e.g. Devanagari in cl100k), 4 above it (emoji);

then a safety margin of 10% on top. On this repository's documents it counts 1.2 to
2.2 times what the bundled model's WordPiece does, paragraph by paragraph (BPE
vocabularies need fewer tokens than WordPiece for English), so chunks are shorter
than they could be; point KBSTREAM_TOKENIZER at the model's tokenizer.json to count
exactly. Text built to defeat it (random letters,
long hex strings) can still exceed the estimate; such a chunk is truncated or refused
by the service, as any over-long input is.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

SAFETY_MARGIN = 1.10

_PIECE = re.compile(r"[A-Za-z0-9]+|[ \t]+|\s+|[\x00-\x7f]|[^\x00-\x7f]")


def _char_tokens(ch: str) -> int:
    code = ord(ch)
    if code < 0x800:
        return 1
    if 0x2E80 <= code <= 0x9FFF or 0xAC00 <= code <= 0xD7AF or 0xF900 <= code <= 0xFAFF:
        return 2  # CJK (ideographs, kana, punctuation) and Hangul
    if code < 0x10000:
        return 3
    return 4


def estimate_tokens(text: str) -> int:
    """An over-estimate of the tokens a remote embedding model sees in ``text``."""
    raw = 0
    for piece in _PIECE.findall(text):
        first = piece[0]
        if first.isascii() and first.isalnum():
            raw += -(-len(piece) // 3)
        elif first in " \t":
            raw += 0 if len(piece) == 1 else 1
        elif first.isascii():  # a line break, or a punctuation mark or symbol
            raw += 1
        else:
            raw += _char_tokens(first)
    return math.ceil(raw * SAFETY_MARGIN)


class ApproximateTokenCounter:
    """ModelTokens for a remote model without a local tokenizer (see the module)."""

    def __init__(self, max_input_tokens: int) -> None:
        self.max_input_tokens = max_input_tokens

    def count_tokens(self, text: str) -> int:
        return estimate_tokens(text)

    def count_tokens_batch(self, texts: Sequence[str]) -> list[int]:
        return [estimate_tokens(t) for t in texts]
