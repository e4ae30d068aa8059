"""Claim-check keys: where the payload store keeps what is too large for the
broker (a document's parsed text, its uploaded file, the removals split still
owes the indexes). The one place that builds them; stages derive every key
from the event's own tenant, dataset, document and version, and never read
a key an event names without checking it is exactly the one they derive.

A key is ``cc/<tenant>/<dataset>/<document>/<kind>/<rest>``, each id replaced
by a fixed-length digest. Ids may contain '/' (domain/events.py ``Id``), so
joining them as they are made ``handbook`` a prefix of ``handbook/annex``;
digests never collide and keep every key within the payloads.key column
(256 characters) for ids of any allowed length. The prefixes nest: one per
tenant, dataset and document, so deleting a document (or a dataset) is one
prefix delete that touches nothing else.

Keys of the format before (``upload/``, ``parsed/``, ``removed/`` followed by
the raw ids) were moved by migration 0008 where their ids held no '/' (then
the old name maps to one document for certain, and an event still in flight
naming it is read from the new key); the others were deleted, and an event
naming one fails with a reason that says what to publish again."""

from __future__ import annotations

import hashlib

from domain.documents import DocKey
from domain.errors import DocumentError

ROOT = "cc/"
UPLOAD_SCHEME = "kbstream-upload"
# 128 bits per id: no collision by chance, none by choice short of a
# second preimage of sha256; 3 x 32 characters leave room for the rest
_DIGEST_CHARS = 32


def _digest(component: str) -> str:
    return hashlib.sha256(component.encode()).hexdigest()[:_DIGEST_CHARS]


def tenant_prefix(tenant_id: str) -> str:
    return f"{ROOT}{_digest(tenant_id)}/"


def dataset_prefix(tenant_id: str, dataset_id: str) -> str:
    """Every payload of one dataset."""
    return f"{tenant_prefix(tenant_id)}{_digest(dataset_id)}/"


def document_prefix(key: DocKey) -> str:
    """Every payload of one document: its uploads, parsed texts and owed removals."""
    return f"{dataset_prefix(key.tenant_id, key.dataset_id)}{_digest(key.document_id)}/"


def parsed_prefix(key: DocKey) -> str:
    """A document's parsed texts; one version's at a time."""
    return f"{document_prefix(key)}parsed/"


def parsed_key(key: DocKey, version: int) -> str:
    return f"{parsed_prefix(key)}{version}"


def upload_prefix(key: DocKey) -> str:
    """A document's uploaded files; only the latest is kept."""
    return f"{document_prefix(key)}upload/"


def upload_key(key: DocKey, content_hash: str) -> str:
    return f"{upload_prefix(key)}{content_hash}"


def removals_key(key: DocKey) -> str:
    """The ids a document's indexes may still hold (split owes their removal)."""
    return f"{document_prefix(key)}removed"


def upload_uri(payload_key: str) -> str:
    return f"{UPLOAD_SCHEME}:{payload_key}"


def _legacy(kind: str, key: DocKey, rest: str) -> str | None:
    """The old-format name of a key, where it was unambiguous (no '/' in any id)."""
    ids = (key.tenant_id, key.dataset_id, key.document_id)
    if any("/" in i for i in ids):
        return None
    return f"{kind}/{'/'.join(ids)}/{rest}"


def upload_payload_key(uri: str | None, key: DocKey) -> str | None:
    """The payload key an upload uri names (None for any other uri). An event
    may only name an upload of its own document: the payload store also holds
    other tenants' files."""
    if uri is None or not uri.startswith(f"{UPLOAD_SCHEME}:"):
        return None
    payload_key = uri[len(UPLOAD_SCHEME) + 1 :]
    prefix = upload_prefix(key)
    rest = payload_key[len(prefix) :]
    if payload_key.startswith(prefix) and rest and "/" not in rest:
        return payload_key
    old_rest = payload_key.rsplit("/", 1)[-1]
    if old_rest and payload_key == _legacy("upload", key, old_rest):
        return upload_key(key, old_rest)  # migration 0008 moved it there
    if not payload_key.startswith(ROOT):
        raise DocumentError(
            f"{uri} is an upload key of an earlier kbstream version, no longer kept; "
            "index the file again"
        )
    raise DocumentError(
        f"{uri} is not an upload of document {key}; publish the document's own upload"
    )


def check_text_ref(text_ref: str, key: DocKey, version: int) -> str:
    """The claim-check key of a parsed event's text: only the key of that
    document's version is read, whatever else an event names."""
    if text_ref == parsed_key(key, version):
        return text_ref
    if text_ref == _legacy("parsed", key, str(version)):
        return parsed_key(key, version)  # migration 0008 moved it there
    if not text_ref.startswith(ROOT):
        raise DocumentError(
            f"parsed text {text_ref} is a key of an earlier kbstream version, no longer "
            "kept; publish the document again"
        )
    raise DocumentError(
        f"parsed text {text_ref} is not the text of document {key} version {version}; "
        "publish the document again"
    )
