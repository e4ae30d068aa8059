"""The Document aggregate's rules, with no database: version fencing,
delete-wins, status transitions and the completion rule."""

from __future__ import annotations

import pytest

from domain.documents import (
    MAX_VERSION,
    TRANSITIONS,
    DocKey,
    Document,
    IndexingStatus,
    SplitCounts,
)
from domain.errors import DocumentError

S = IndexingStatus
KEY = DocKey("t", "ds", "doc")


def parsing(version: int = 3) -> Document:
    doc = Document.new(KEY)
    assert doc.start_parsing(version, "a.md")
    return doc


def indexing(version: int = 3) -> Document:
    doc = parsing(version)
    assert doc.parsed(version, chars=100)
    assert doc.split(version, SplitCounts(added=2), (2, 40, 30), pending=True)
    return doc


class TestVersionFencing:
    def test_first_claim_takes_the_version(self) -> None:
        doc = parsing(3)
        assert (doc.version, doc.status, doc.source) == (3, S.PARSING, "a.md")

    def test_a_claim_records_what_the_version_is_read_from(self) -> None:
        doc = Document.new(KEY)
        assert (doc.uri, doc.inline_content) == (None, None)  # unknown until claimed
        assert doc.start_parsing(1, "/etc/shown-name", uri="kbstream-upload:upload/t/ds/doc/h")
        assert (doc.uri, doc.inline_content) == ("kbstream-upload:upload/t/ds/doc/h", False)
        # the next version came inline: the earlier reference is not kept
        assert doc.start_parsing(2, "/etc/shown-name")
        assert (doc.uri, doc.inline_content) == (None, True)

    def test_newer_version_wins_and_resets_work_counters(self) -> None:
        doc = indexing(3)
        doc.embedded_texts, doc.cache_hits = 5, 2
        assert doc.start_parsing(4, "a.md")
        assert (doc.version, doc.embedded_texts, doc.cache_hits) == (4, 0, 0)

    def test_older_version_is_stale(self) -> None:
        doc = indexing(3)
        assert not doc.start_parsing(2, "a.md")
        assert (doc.version, doc.status) == (3, S.INDEXING)

    def test_redelivered_same_version_is_claimed_again_keeping_counters(self) -> None:
        doc = indexing(3)
        doc.embedded_texts = 5
        assert doc.start_parsing(3, "a.md")
        assert (doc.status, doc.embedded_texts) == (S.PARSING, 5)

    def test_missing_version_comes_after_everything_known(self) -> None:
        doc = indexing(3)
        assert doc.resolve_version(None) == 4
        assert doc.resolve_version(7) == 7

    def test_no_version_is_resolved_past_what_the_database_holds(self) -> None:
        doc = Document.new(KEY, version=MAX_VERSION)
        assert doc.resolve_version(MAX_VERSION) == MAX_VERSION
        with pytest.raises(DocumentError, match="the last one a version can hold"):
            doc.resolve_version(None)

    def test_a_copy_of_the_claiming_event_is_the_same_version(self) -> None:
        doc = Document.new(KEY)
        v = doc.resolve_version(None, "evt-1")
        assert doc.start_parsing(v, "a.md", event_id="evt-1")
        doc.embedded_texts = 5
        assert doc.resolve_version(None, "evt-1") == v == 1
        assert doc.resolve_version(None, "evt-2") == 2
        assert doc.start_parsing(doc.resolve_version(None, "evt-1"), "a.md", event_id="evt-1")
        assert (doc.version, doc.embedded_texts) == (1, 5)

    def test_a_copy_of_a_deleted_claim_stays_deleted(self) -> None:
        doc = Document.new(KEY)
        assert doc.start_parsing(doc.resolve_version(None, "evt-1"), "a.md", event_id="evt-1")
        assert doc.delete(doc.version)
        assert not doc.start_parsing(doc.resolve_version(None, "evt-1"), "a.md", event_id="evt-1")
        assert doc.status is S.DELETED

    def test_drop_records_why(self) -> None:
        doc = indexing(3)
        doc.drop("document.updated", 2)
        assert doc.last_dropped is not None
        assert "v2" in doc.last_dropped and "v3" in doc.last_dropped


class TestDeleteWins:
    def test_delete_blocks_equal_and_older_versions(self) -> None:
        doc = indexing(3)
        assert doc.delete(5)
        assert doc.deleted and doc.version == 5
        assert not doc.start_parsing(5, "a.md")
        assert not doc.start_parsing(4, "a.md")

    def test_newer_create_after_delete_revives(self) -> None:
        doc = indexing(3)
        assert doc.delete(5)
        assert doc.start_parsing(6, "a.md")
        assert doc.status is S.PARSING

    def test_delete_older_than_current_is_stale(self) -> None:
        doc = indexing(3)
        assert not doc.delete(2)
        assert doc.status is S.INDEXING

    def test_work_of_a_deleted_version_changes_nothing(self) -> None:
        doc = indexing(3)
        doc.delete(3)
        assert not doc.fail(3, "late failure")
        assert not doc.split(3, SplitCounts(), (0, 0, 0), pending=False)
        assert not doc.move_to(S.COMPLETED, 3)
        assert doc.status is S.DELETED

    def test_purge_only_for_the_deleted_version(self) -> None:
        doc = indexing(3)
        assert not doc.segments_purged(3, 2)
        doc.delete(4)
        assert not doc.segments_purged(3, 2)
        assert doc.segments_purged(4, 2)
        assert (doc.segment_count, doc.segments_removed) == (0, 2)


class TestForget:
    """Issue 20 item 12: a purged tombstone keeps only what fences events."""

    def test_a_tombstone_forgets_its_texts_and_still_fences(self) -> None:
        doc = indexing(3)
        doc.content_hash = "sha256:abc"
        assert doc.delete(4)
        assert not doc.forget()  # its segments are not gone yet
        assert doc.segments_purged(4, 2)
        doc.drop("document.updated", 3)
        doc.error = "segment 'secret plans'... too long"
        assert doc.forget()
        assert (doc.source, doc.content_hash, doc.error, doc.last_dropped) == ("", None, None, None)
        assert not doc.forget()  # nothing left to blank
        assert (doc.version, doc.status) == (4, S.DELETED)
        assert not doc.start_parsing(4, "a.md")  # the fence holds
        assert doc.start_parsing(5, "a.md")

    def test_a_live_document_forgets_nothing(self) -> None:
        doc = indexing(3)
        assert not doc.forget()
        assert doc.source == "a.md"


class TestTransitions:
    def test_forward_path(self) -> None:
        doc = parsing(1)
        assert doc.parsed(1, chars=10) and doc.status is S.SPLITTING
        assert doc.split(1, SplitCounts(added=1), (1, 5, 4), pending=True)
        assert doc.status is S.INDEXING and doc.completed_at is None
        assert doc.complete(1, pending_segments=0, stores_agree=True)
        assert doc.status is S.COMPLETED and doc.completed_at is not None

    def test_only_the_current_version_moves(self) -> None:
        doc = indexing(3)
        assert not doc.move_to(S.COMPLETED, 2)
        assert not doc.fail(2, "old failure")
        assert doc.status is S.INDEXING and doc.error is None

    def test_no_backward_moves_within_a_version(self) -> None:
        doc = indexing(3)
        assert not doc.move_to(S.PARSING, 3)
        assert not doc.move_to(S.SPLITTING, 3)

    def test_error_records_reason_capped(self) -> None:
        doc = indexing(3)
        assert doc.fail(3, "x" * 10_000)
        assert doc.status is S.ERROR and doc.error is not None and len(doc.error) == 4000

    def test_deleted_is_terminal_for_transitions(self) -> None:
        assert TRANSITIONS[S.DELETED] == frozenset()

    @pytest.mark.parametrize("status", [s for s in S if s is not S.DELETED])
    def test_error_reachable_from_every_live_status(self, status: IndexingStatus) -> None:
        assert S.ERROR in TRANSITIONS[status]

    def test_split_with_nothing_pending_completes_at_once(self) -> None:
        doc = parsing(1)
        doc.parsed(1, chars=10)
        assert doc.split(1, SplitCounts(kept=3), (3, 9, 9), pending=False)
        assert doc.status is S.COMPLETED

    def test_redelivered_split_keeps_the_first_counters(self) -> None:
        doc = indexing(3)
        assert doc.split(3, SplitCounts(), (2, 40, 30), pending=True)
        assert doc.segments_added == 2

    def test_keep_removed_forgets_the_content_hash(self) -> None:
        doc = parsing(1)
        doc.content_hash = "abc"
        doc.split(1, SplitCounts(removed=1), (1, 1, 1), pending=False, forget_content_hash=True)
        assert doc.content_hash is None


class TestCompletion:
    def test_needs_every_segment_flagged_and_stores_in_agreement(self) -> None:
        doc = indexing(3)
        assert not doc.may_complete(3, pending_segments=1, stores_agree=True)
        assert not doc.may_complete(3, pending_segments=0, stores_agree=False)
        assert not doc.may_complete(2, pending_segments=0, stores_agree=True)
        assert doc.may_complete(3, pending_segments=0, stores_agree=True)

    def test_only_an_indexing_document_completes(self) -> None:
        doc = parsing(3)
        assert not doc.complete(3, 0, True)

    def test_imports_reopen_a_completed_document(self) -> None:
        doc = indexing(3)
        doc.complete(3, 0, True)
        assert doc.segments_imported(4, added=2, tokens=10, words=8)
        assert doc.status is S.INDEXING and doc.segment_count == 4

    def test_a_segment_delete_reopens_a_completed_document_until_the_indexes_follow(
        self,
    ) -> None:
        doc = indexing(3)
        doc.complete(3, 0, True)
        assert doc.segment_deleted(3, tokens=20, words=15)
        assert (doc.status, doc.segment_count, doc.completed_at) == (S.INDEXING, 1, None)
        assert doc.complete(3, 0, True)
        assert doc.fail(3, "broken")
        assert doc.segment_deleted(3, tokens=20, words=15)
        assert doc.status is S.ERROR  # an error stays for a person to see

    def test_imports_older_than_the_document_are_refused(self) -> None:
        doc = indexing(3)
        assert not doc.segments_imported(2, added=1, tokens=1, words=1)

    def test_embedding_counts_ignore_older_versions(self) -> None:
        doc = indexing(3)
        assert doc.count_embeddings(3, 2, 1)
        assert not doc.count_embeddings(2, 9, 9)
        assert (doc.embedded_texts, doc.cache_hits) == (2, 1)
