"""The Document aggregate's rules, with no database: version fencing,
delete-wins, status transitions (through one table), the completion rule,
owed removals, when a delete is settled, and segment-event versions."""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from domain.documents import (
    FORWARD,
    MAX_VERSION,
    TRANSITIONS,
    DocKey,
    Document,
    IndexingStatus,
    SplitCounts,
    indexes_hold_exactly,
    owed_removals,
    segment_event_version,
)
from domain.errors import DocumentError, IllegalTransition

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

    def test_deleted_is_terminal_within_a_version(self) -> None:
        assert FORWARD[S.DELETED] == frozenset()
        # only a claim (of a newer version) or another delete leaves it
        assert TRANSITIONS[S.DELETED] == frozenset({S.PARSING, S.DELETED})

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


ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 1, 1, tzinfo=UTC)

# Every public method of Document that can change its status, applied to a
# document at version 3 with arguments that make the event apply.
TRANSITION_CALLS: dict[str, Callable[[Document], bool]] = {
    "start_parsing": lambda d: d.start_parsing(4, "a.md", now=T0),
    "delete": lambda d: d.delete(4, now=T0),
    "move_to": lambda d: d.move_to(S.INDEXING, 3, now=T0),
    "fail": lambda d: d.fail(3, "broken", now=T0),
    "parsed": lambda d: d.parsed(3, chars=10, now=T0),
    "split": lambda d: d.split(3, SplitCounts(added=1), (1, 5, 4), pending=True, now=T0),
    "segments_imported": lambda d: d.segments_imported(3, 1, 5, 4, now=T0),
    "segment_deleted": lambda d: d.segment_deleted(3, tokens=5, words=4, now=T0),
    "complete": lambda d: d.complete(3, pending_segments=0, stores_agree=True),
    "switch": lambda d: d.switch(3, enabled=False, now=T0),
    "segment_switched": lambda d: d.segment_switched(3, now=T0),
}


def _document_class() -> ast.ClassDef:
    tree = ast.parse((ROOT / "domain" / "documents.py").read_text())
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Document")


def _self_calls(fn: ast.FunctionDef) -> set[str]:
    return {
        n.func.attr
        for n in ast.walk(fn)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and isinstance(n.func.value, ast.Name)
        and n.func.value.id == "self"
    }


class TestTransitionTable:
    """Issue 21 item 2: the aggregate is the only writer of status, and every
    status change goes through its transition table."""

    def test_moves_within_a_version_are_in_the_table(self) -> None:
        for status, targets in FORWARD.items():
            assert targets <= TRANSITIONS[status], status

    def test_a_move_outside_the_table_raises(self) -> None:
        # a document never claimed has nothing to split or index
        with pytest.raises(IllegalTransition, match="waiting -> indexing"):
            Document.new(KEY).split(0, SplitCounts(added=1), (1, 5, 4), pending=True)
        with pytest.raises(IllegalTransition, match="waiting -> completed"):
            Document.new(KEY).split(0, SplitCounts(), (0, 0, 0), pending=False)
        with pytest.raises(IllegalTransition):
            Document.new(KEY).segments_imported(0, added=1, tokens=5, words=4)

    def test_a_stale_event_is_refused_not_raised(self) -> None:
        doc = indexing(3)
        doc.delete(3)
        assert not doc.split(3, SplitCounts(), (0, 0, 0), pending=True)
        assert not doc.move_to(S.INDEXING, 3)
        assert doc.status is S.DELETED

    def test_nothing_but_the_aggregate_assigns_status(self) -> None:
        """No `x.status = ...` (or `replace(x, status=...)`) anywhere in the
        code, except in the aggregate's one private method."""
        writers: list[str] = []
        for package in ("domain", "consumers", "kbstream", "infra"):
            for path in sorted((ROOT / package).rglob("*.py")):
                tree = ast.parse(path.read_text())
                for fn in ast.walk(tree):
                    if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                        continue
                    for node in ast.walk(fn):
                        targets: list[ast.expr] = []
                        if isinstance(node, ast.Assign):
                            targets = node.targets
                        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                            targets = [node.target]
                        hit = any(
                            isinstance(t, ast.Attribute) and t.attr == "status" for t in targets
                        ) or (
                            isinstance(node, ast.Call)
                            and getattr(node.func, "id", getattr(node.func, "attr", ""))
                            == "replace"
                            and any(k.arg == "status" for k in node.keywords)
                        )
                        if hit:
                            writers.append(f"{path.relative_to(ROOT)}:{fn.name}")
        assert writers == ["domain/documents.py:_enter"]

    def test_every_public_transition_method_is_covered(self) -> None:
        methods = {n.name: n for n in _document_class().body if isinstance(n, ast.FunctionDef)}
        moving = {"_enter"}
        while True:  # methods that reach _enter, directly or through another method
            more = {name for name, fn in methods.items() if _self_calls(fn) & moving}
            if more <= moving:
                break
            moving |= more
        public = {m for m in moving if not m.startswith("_")}
        assert public == set(TRANSITION_CALLS)

    @pytest.mark.parametrize("method", sorted(TRANSITION_CALLS))
    @pytest.mark.parametrize("status", list(S))
    def test_every_transition_method_from_every_status_stays_in_the_table(
        self, method: str, status: IndexingStatus
    ) -> None:
        doc = Document(key=KEY, version=3, status=status, segment_count=2)
        try:
            applied = TRANSITION_CALLS[method](doc)
        except IllegalTransition:
            # only a document never claimed refuses what needs a claim
            assert status is S.WAITING and method in {"split", "segments_imported"}
            assert doc.status is S.WAITING
            return
        if doc.status is not status:
            assert applied and doc.status in TRANSITIONS[status]
            assert doc.updated_at == T0 or method == "complete"


class TestEnterStampsTheTime:
    """The one place status changes also records when each status began."""

    def test_claim_parse_split_complete(self) -> None:
        t = [datetime(2026, 1, 1, h, tzinfo=UTC) for h in range(6)]
        doc = Document.new(KEY)
        assert doc.start_parsing(1, "a.md", now=t[0])
        assert (doc.parsing_started_at, doc.updated_at, doc.completed_at) == (t[0], t[0], None)
        assert doc.parsed(1, chars=10, now=t[1])
        assert (doc.splitting_started_at, doc.updated_at) == (t[1], t[1])
        assert doc.split(1, SplitCounts(), (1, 1, 1), pending=False, now=t[2])
        # indexing starts with the split, even when nothing is left to index
        assert (doc.indexing_started_at, doc.completed_at) == (t[2], t[2])
        assert doc.segments_imported(2, added=1, tokens=1, words=1, now=t[3])
        # an import extends the running indexing: its clock is not restarted
        assert (doc.status, doc.indexing_started_at, doc.completed_at) == (S.INDEXING, t[2], None)
        assert doc.updated_at == t[3]
        assert doc.fail(1, "broken", now=t[4])
        assert (doc.error_at, doc.updated_at) == (t[4], t[4])
        assert doc.start_parsing(2, "a.md", now=t[5])
        assert (doc.error, doc.error_at, doc.parsing_started_at) == (None, None, t[5])

    def test_a_segment_delete_restarts_indexing_of_a_completed_document(self) -> None:
        t = [datetime(2026, 1, 1, h, tzinfo=UTC) for h in range(2)]
        doc = parsing(1)
        doc.parsed(1, chars=10)
        doc.split(1, SplitCounts(), (2, 2, 2), pending=False, now=t[0])
        assert doc.segment_deleted(1, tokens=1, words=1, now=t[1])
        assert (doc.status, doc.indexing_started_at, doc.completed_at) == (S.INDEXING, t[1], None)


class TestCompletionRule:
    def test_awaits_the_indexes_only_when_indexing_and_every_segment_flagged(self) -> None:
        doc = indexing(3)
        assert doc.awaits_indexes(pending_segments=0)
        assert not doc.awaits_indexes(pending_segments=1)
        assert not parsing(3).awaits_indexes(pending_segments=0)

    def test_indexes_must_hold_exactly_the_segments(self) -> None:
        segments = {"a", "b"}
        assert indexes_hold_exactly(segments, {"a", "b"}, {"b", "a"})
        assert not indexes_hold_exactly(segments, {"a", "b"}, {"a"})  # one still missing
        assert not indexes_hold_exactly(segments, {"a", "b", "c"})  # a removal still owed
        assert indexes_hold_exactly(set(), set())


class TestOwedRemovals:
    def test_earlier_and_new_removals_minus_the_alive(self) -> None:
        owed = owed_removals(["c", "a"], ["b", "a"], alive={"c"})
        assert owed == ["a", "b"]

    def test_nothing_owed(self) -> None:
        assert owed_removals([], [], alive=set()) == []
        assert owed_removals(["a"], [], alive={"a"}) == []


def _held(*ids: set[str]) -> Iterator[set[str]]:
    yield from ids


def _unasked() -> Iterator[set[str]]:
    raise AssertionError("the indexes were asked")
    yield set()  # pragma: no cover - makes this a generator


class TestDone:
    """When a caller waiting for a version (index, sync, verify --repair) is done."""

    def test_a_live_document_is_done_at_the_version_once_finished(self) -> None:
        doc = indexing(3)
        assert not doc.done(3, _unasked())  # still indexing
        doc.complete(3, 0, True)
        assert doc.done(3, _unasked())
        assert doc.done(2, _unasked())
        assert not doc.done(4, _unasked())  # that version has not arrived

    def test_a_delete_waits_for_split_then_both_indexes(self) -> None:
        doc = indexing(3)
        doc.delete(4)
        assert not doc.done(4, _unasked())  # split has not removed the rows yet
        doc.segments_purged(4, 2)
        assert not doc.done(4, _held({"x"}, set()))  # the keyword index still holds one
        assert not doc.done(4, _held(set(), {"x"}))  # the vector index still holds one
        assert doc.done(4, _held(set(), set()))
        assert doc.delete_settled(_held(set(), set()))

    def test_the_indexes_are_asked_only_as_far_as_needed(self) -> None:
        doc = indexing(3)
        doc.delete(4)
        doc.segments_purged(4, 2)

        def held() -> Iterator[set[str]]:
            yield {"x"}
            raise AssertionError("the second index was asked")

        assert not doc.done(4, held())

    def test_a_live_document_is_never_delete_settled(self) -> None:
        assert not indexing(3).delete_settled(_held(set(), set()))


class TestSegmentEventVersion:
    def test_an_explicit_version_wins(self) -> None:
        assert segment_event_version(2, indexing(3)) == 2
        assert segment_event_version(2, None) == 2

    def test_without_one_the_current_version(self) -> None:
        assert segment_event_version(None, indexing(3)) == 3
        assert segment_event_version(None, None) == 0  # a document not known yet

    def test_a_delete_without_a_version_applies_to_the_current_one(self) -> None:
        doc = indexing(3)
        assert doc.applies_to(None) == 3
        assert doc.applies_to(5) == 5


class TestSwitches:
    """Issue 19: Dify's document switches are version-fenced, idempotent and
    kept across versions; a change of what belongs in the indexes reopens a
    completed document until they have followed."""

    def _completed(self) -> Document:
        return Document(key=KEY, version=3, status=S.COMPLETED, segment_count=2)

    def test_disable_reopens_a_completed_document_and_a_repeat_changes_nothing(self) -> None:
        doc = self._completed()
        assert doc.switch(3, enabled=False, now=T0)
        assert (doc.enabled, doc.searchable, doc.status) == (False, False, S.INDEXING)
        doc.status = S.COMPLETED  # the indexes followed
        assert doc.switch(3, enabled=False, now=T0)
        assert doc.status is S.COMPLETED

    def test_a_switch_older_than_the_current_version_is_stale(self) -> None:
        doc = self._completed()
        assert not doc.switch(2, enabled=False, now=T0)
        assert doc.enabled and doc.status is S.COMPLETED

    def test_a_deleted_document_takes_no_switch(self) -> None:
        doc = self._completed()
        assert doc.delete(3, now=T0)
        assert not doc.switch(3, archived=True, now=T0)
        assert not doc.archived

    def test_archive_refuses_updates_until_unarchived(self) -> None:
        doc = self._completed()
        assert doc.switch(3, archived=True, now=T0)
        assert not doc.searchable
        reason = doc.refusal("document.updated")
        assert reason is not None and "archived" in reason
        assert doc.switch(3, archived=False, now=T0)
        assert doc.refusal("document.updated") is None and doc.searchable

    def test_a_disabled_document_stays_disabled_in_its_next_version(self) -> None:
        doc = self._completed()
        assert doc.switch(3, enabled=False, now=T0)
        assert doc.start_parsing(4, "a.md", now=T0)
        assert not doc.enabled

    def test_segment_switched_moves_totals_and_reopens(self) -> None:
        doc = self._completed()
        doc.tokens, doc.word_count = 10, 8
        assert doc.segment_switched(3, tokens=-2, words=3, now=T0)
        assert (doc.tokens, doc.word_count, doc.status) == (8, 11, S.INDEXING)
        assert not doc.segment_switched(2, now=T0)
