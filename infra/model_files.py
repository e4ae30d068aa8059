"""What a local model folder says about its model, read without loading it:
shared by the local provider (infra/embedding.py) and the remote provider's
token counter (infra/remote_embedding.py), which may count with a local copy
of the remote model's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_MAX_SEQ_LENGTH = 256  # sentence-transformers' default


def max_seq_length(model_dir: Path) -> int:
    """The longest input, in tokens with the special ones, the model reads."""
    cfg = model_dir / "sentence_bert_config.json"
    if cfg.exists():
        return int(json.loads(cfg.read_text()).get("max_seq_length", DEFAULT_MAX_SEQ_LENGTH))
    return DEFAULT_MAX_SEQ_LENGTH
