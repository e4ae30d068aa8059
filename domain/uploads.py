"""The claim check for uploaded files: `kbstream index` stores a file's bytes
in the shared database and publishes ``kbstream-upload:<key>`` as the event's
uri, so a parse worker on any machine reads them without a shared filesystem."""

from __future__ import annotations

from domain.documents import DocKey
from domain.errors import DocumentError

UPLOAD_SCHEME = "kbstream-upload"


def upload_prefix(key: DocKey) -> str:
    """Every upload of one document; only the latest is kept."""
    return f"upload/{key.tenant_id}/{key.dataset_id}/{key.document_id}/"


def upload_key(key: DocKey, content_hash: str) -> str:
    return f"{upload_prefix(key)}{content_hash}"


def upload_uri(payload_key: str) -> str:
    return f"{UPLOAD_SCHEME}:{payload_key}"


def upload_payload_key(uri: str | None, key: DocKey) -> str | None:
    """The payload key an upload uri names (None for any other uri). An event
    may only name an upload of its own document: the payload store also holds
    other tenants' texts."""
    if uri is None or not uri.startswith(f"{UPLOAD_SCHEME}:"):
        return None
    payload_key = uri[len(UPLOAD_SCHEME) + 1 :]
    prefix = upload_prefix(key)
    rest = payload_key[len(prefix) :]
    if not payload_key.startswith(prefix) or not rest or "/" in rest:
        raise DocumentError(
            f"{uri} is not an upload of document {key}; publish the document's own upload"
        )
    return payload_key
