"""Claim-check keys (domain/claim_check.py): they never collide for any ids
the event schema allows ('/' included), fit the payloads.key column, nest per
tenant, dataset and document, and only the event's own keys are accepted."""

from __future__ import annotations

import itertools

import pytest

from domain.claim_check import (
    check_text_ref,
    dataset_prefix,
    document_prefix,
    parsed_key,
    parsed_prefix,
    removals_key,
    upload_key,
    upload_payload_key,
    upload_prefix,
    upload_uri,
)
from domain.documents import DocKey
from domain.errors import DocumentError

KEY_COLUMN = 256  # infra/db/models.py PayloadRow.key


def keys_of(key: DocKey) -> list[str]:
    return [parsed_key(key, 12), upload_key(key, "f" * 64), removals_key(key)]


# ids that the old format (raw ids joined with '/') made collide or nest
CLASHING = [
    DocKey("t", "d", "handbook"),
    DocKey("t", "d", "handbook/annex"),
    DocKey("t", "d/handbook", "annex"),
    DocKey("t/d", "handbook", "annex"),
    DocKey("t", "d", "handbook/annex/1"),
    DocKey("t", "d", "handbook/annex/upload"),
    DocKey("t", "d", "removed"),
    DocKey("T", "d", "handbook"),
]


@pytest.mark.parametrize(("a", "b"), list(itertools.permutations(CLASHING, 2)))
def test_no_key_of_one_document_is_under_anothers_prefix(a: DocKey, b: DocKey) -> None:
    assert not document_prefix(b).startswith(document_prefix(a))
    for k in keys_of(b):
        assert not k.startswith(document_prefix(a))
        assert k not in keys_of(a)


def test_prefixes_nest_per_dataset_and_document() -> None:
    key = DocKey("acme", "manuals", "handbook/annex")
    assert document_prefix(key).startswith(dataset_prefix("acme", "manuals"))
    for k in keys_of(key):
        assert k.startswith(document_prefix(key))
    assert parsed_key(key, 3).startswith(parsed_prefix(key))
    assert upload_key(key, "abc").startswith(upload_prefix(key))
    # removals are not under another kind's prefix, nor the other way round
    assert not removals_key(key).startswith((parsed_prefix(key), upload_prefix(key)))
    other = DocKey("acme", "manuals/x", "handbook")
    assert not document_prefix(other).startswith(dataset_prefix("acme", "manuals"))


def test_keys_fit_the_column_with_the_longest_ids() -> None:
    longest = DocKey("/" * 128, "a/" * 64, "z" * 128)
    # content_hash may be any string up to 128 characters (domain/events.py)
    for k in [*keys_of(longest), upload_key(longest, "h" * 128), parsed_key(longest, 2**63)]:
        assert len(k) <= KEY_COLUMN, k


def test_an_upload_uri_names_only_the_events_own_document() -> None:
    a, b = DocKey("t", "d", "handbook"), DocKey("t", "d", "handbook/annex")
    mine = upload_key(a, "abc")
    assert upload_payload_key(upload_uri(mine), a) == mine
    assert upload_payload_key("file:///tmp/a.md", a) is None
    assert upload_payload_key(None, a) is None
    for forged in [upload_key(b, "abc"), parsed_key(a, 1), upload_key(a, ""), f"{mine}/x"]:
        with pytest.raises(DocumentError, match="is not an upload of document t/d/handbook"):
            upload_payload_key(upload_uri(forged), a)


def test_an_unambiguous_old_format_upload_uri_reads_the_key_the_migration_moved_it_to() -> None:
    a = DocKey("t", "d", "handbook")
    assert upload_payload_key("kbstream-upload:upload/t/d/handbook/abc", a) == upload_key(a, "abc")
    # another document's old key is still not this one's
    with pytest.raises(DocumentError, match=r"earlier kbstream version.*index the file again"):
        upload_payload_key("kbstream-upload:upload/t/d/other/abc", a)


def test_an_old_format_upload_uri_of_ids_with_slashes_says_to_index_again() -> None:
    # upload/t/d/handbook/annex/abc: tenant t, dataset d, document handbook/annex,
    # or dataset d/handbook, document annex? The migration could not tell either.
    with pytest.raises(DocumentError, match=r"earlier kbstream version.*index the file again"):
        upload_payload_key(
            "kbstream-upload:upload/t/d/handbook/annex/abc", DocKey("t", "d", "handbook/annex")
        )


def test_a_text_ref_is_accepted_only_as_the_documents_version_key() -> None:
    a, b = DocKey("t", "d", "handbook"), DocKey("u", "d", "handbook")
    assert check_text_ref(parsed_key(a, 2), a, 2) == parsed_key(a, 2)
    for forged in [parsed_key(b, 2), parsed_key(a, 1), upload_key(a, "2"), removals_key(a)]:
        with pytest.raises(DocumentError, match="is not the text of document t/d/handbook v"):
            check_text_ref(forged, a, 2)
    # an unambiguous old-format key: migration 0008 moved the text to the new key
    assert check_text_ref("parsed/t/d/handbook/2", a, 2) == parsed_key(a, 2)
    for old in ["parsed/t/d/handbook/1", "parsed/t/d/other/2"]:
        with pytest.raises(DocumentError, match=r"earlier kbstream version.*publish the document"):
            check_text_ref(old, a, 2)
