"""model_identity against real copies of the bundled all-MiniLM-L6-v2 folder.

/models/v1/encoder and /models/v2/encoder used to share the name ``encoder``, hence one
embedding cache key and one collection, whatever their weights.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from domain.errors import PermanentError
from infra import embedding
from infra.embedding import (
    BUNDLED_MODEL_NAME,
    SentenceTransformerProvider,
    model_fingerprint,
    model_identity,
    output_dim,
    resolve_model,
)
from infra.vectors import collection_name

MiB = 1024 * 1024
ST = "sentence-transformers"


@pytest.fixture(autouse=True)
def digest_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A digest cache of this test's own, empty at the start."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(embedding._DigestCache, "_shared", None)
    return tmp_path / "xdg" / "kbstream" / "model-digests.json"


@pytest.fixture(scope="module")
def bundled() -> Path:
    return resolve_model(None)[1]


def copy_model(bundled: Path, to: Path) -> Path:
    shutil.copytree(bundled, to)
    return to


def scale_middle_tensor(weights: Path) -> str:
    """Scale, in place, the float32 tensor nearest the middle of a safetensors file:
    the size, the header and the first and last MiB stay as they were."""
    raw = weights.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    base = 8 + header_len
    middle = len(raw) // 2
    name, info = min(
        ((n, i) for n, i in header.items() if n != "__metadata__" and i["dtype"] == "F32"),
        key=lambda item: abs(base + item[1]["data_offsets"][0] - middle),
    )
    start, end = (base + offset for offset in info["data_offsets"])
    values = np.frombuffer(raw[start:end], dtype="<f4") * np.float32(1.5)
    with open(weights, "r+b") as handle:
        handle.seek(start)
        handle.write(values.astype("<f4").tobytes())
    return str(name)


def test_swapped_weights_get_another_identity(bundled: Path, tmp_path: Path) -> None:
    v1 = copy_model(bundled, tmp_path / "models" / "v1" / "encoder")
    v2 = copy_model(bundled, tmp_path / "models" / "v2" / "encoder")
    weights = v2 / "model.safetensors"
    before = weights.read_bytes()
    scale_middle_tensor(weights)
    after = weights.read_bytes()
    assert len(after) == len(before) and after != before
    assert after[:MiB] == before[:MiB] and after[-MiB:] == before[-MiB:], (
        "sampling the ends of the file would not have told them apart"
    )

    first, second = model_identity(ST, str(v1)), model_identity(ST, str(v2))
    assert first[1].startswith("encoder@") and second[1].startswith("encoder@")
    assert first != second
    assert first[2] == second[2] == 384
    assert collection_name(*first) != collection_name(*second)


def test_byte_identical_copies_share_an_identity(bundled: Path, tmp_path: Path) -> None:
    v1 = copy_model(bundled, tmp_path / "v1" / "encoder")
    elsewhere = copy_model(bundled, tmp_path / "mirror" / "encoder")
    assert model_identity(ST, str(v1)) == model_identity(ST, str(elsewhere))


def test_a_config_change_changes_the_identity(bundled: Path, tmp_path: Path) -> None:
    v1 = copy_model(bundled, tmp_path / "v1" / "encoder")
    v2 = copy_model(bundled, tmp_path / "v2" / "encoder")
    pooling = v2 / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    config.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    pooling.write_text(json.dumps(config))
    assert model_fingerprint(v1) != model_fingerprint(v2)
    (v1 / "README.md").write_text("documentation changes nothing")
    (v1 / ".gitattributes").write_text("neither does this")
    assert model_fingerprint(v1) == model_fingerprint(bundled)


def test_bundled_model_keeps_a_readable_name() -> None:
    provider, model, dim = model_identity(ST, None)
    name, _, fingerprint = model.partition("@")
    assert (provider, name, dim) == (ST, BUNDLED_MODEL_NAME, 384)
    assert len(fingerprint) == 12 and int(fingerprint, 16) >= 0
    assert model_identity("local", "all-MiniLM-L6-v2") == (provider, model, dim)


def test_digests_are_cached_across_processes(
    bundled: Path, digest_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity = model_identity(ST, None)
    entries = json.loads(digest_cache.read_text())
    assert [key.split("|")[0] for key in entries] == [str(bundled / "model.safetensors")]
    # A poisoned entry is what a later process would use: proof it reads the cache.
    poisoned = {key: "0" * 64 for key in entries}
    digest_cache.write_text(json.dumps(poisoned))
    monkeypatch.setattr(embedding._DigestCache, "_shared", None)  # as in a new process
    assert model_identity(ST, None) != identity


def test_identity_does_not_load_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from infra.embedding import model_identity; "
        "print(model_identity('sentence-transformers', None)); "
        "assert 'torch' not in sys.modules and 'sentence_transformers' not in sys.modules"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"XDG_CACHE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_unknown_provider_and_folders_that_are_not_models(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="unknown embedding provider"):
        model_identity("openai", None)
    with pytest.raises(PermanentError, match=r"neither modules\.json nor config\.json"):
        model_identity(ST, str(tmp_path))


# -- the output dimension, read from configuration -----------------------------------------


def model_folder(tmp_path: Path, modules: list[tuple[str, str, dict[str, object]]]) -> Path:
    """A model folder with only its configuration: (type, path, config) per module."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 768}))
    listed = []
    for idx, (kind, path, config) in enumerate(modules):
        listed.append({"idx": idx, "name": str(idx), "path": path, "type": kind})
        if path:
            (folder / path).mkdir()
            (folder / path / "config.json").write_text(json.dumps(config))
    (folder / "modules.json").write_text(json.dumps(listed))
    return folder


TRANSFORMER = ("sentence_transformers.models.Transformer", "", {})
NORMALIZE = ("sentence_transformers.models.Normalize", "2_Normalize", {})


@pytest.mark.parametrize(
    ("modules", "dim"),
    [
        ([TRANSFORMER], 768),
        (
            [
                TRANSFORMER,
                (
                    "sentence_transformers.models.Pooling",
                    "1_Pooling",
                    {
                        "word_embedding_dimension": 768,
                        "pooling_mode_mean_tokens": True,
                        "pooling_mode_max_tokens": True,
                        "pooling_mode_cls_token": False,
                    },
                ),
                NORMALIZE,
            ],
            1536,
        ),
        (
            [
                TRANSFORMER,
                (
                    "sentence_transformers.sentence_transformer.modules.Pooling",
                    "1_Pooling",
                    {"embedding_dimension": 768, "pooling_mode": "cls"},
                ),
                (
                    "sentence_transformers.models.Dense",
                    "2_Dense",
                    {"in_features": 768, "out_features": 256},
                ),
                NORMALIZE,
            ],
            256,
        ),
    ],
    ids=["transformer only", "mean and max pooling", "dense projection"],
)
def test_output_dim_from_configuration(
    tmp_path: Path, modules: list[tuple[str, str, dict[str, object]]], dim: int
) -> None:
    assert output_dim(model_folder(tmp_path, modules)) == dim


def test_output_dim_unknown(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, [NORMALIZE])
    (folder / "config.json").write_text("{}")
    with pytest.raises(PermanentError, match="cannot tell the output dimension"):
        output_dim(folder)


# -- the loaded model checks the dimension against a real embedding -------------------------


def test_loaded_model_checks_its_dimension() -> None:
    provider = SentenceTransformerProvider(None)
    assert (provider.provider, provider.model, provider.dim) == model_identity(ST, None)
    assert len(provider.embed(["hello"])[0]) == provider.dim == 384

    lying = SentenceTransformerProvider(None)
    lying.dim = 383  # what a collection built for another model would expect
    for _ in range(2):  # the refusal is remembered, not re-discovered by loading again
        with pytest.raises(PermanentError, match="produces 384-dimensional vectors"):
            lying.embed(["hello"])
