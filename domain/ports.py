"""The small interfaces domain code needs from the outside world."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class TokenCounter(Protocol):
    """Counts tokens the way the embedding model will see them."""

    def count_tokens(self, text: str) -> int: ...


class ModelTokens(TokenCounter, Protocol):
    """A token counter that also knows the model's input limit."""

    max_input_tokens: int


class EmbeddingProvider(ModelTokens, Protocol):
    """A text embedding model. ``provider`` and ``model`` key the embedding
    cache, so two providers serving the same model never share vectors by
    accident."""

    provider: str
    model: str
    dim: int

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...
