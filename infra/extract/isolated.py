"""Text extraction in a child process with CPU-time, memory and wall-clock limits.

Size checks cannot bound the work a parser does: a 300 KB PDF whose 2,000 pages share
one content stream inflating to 70 MB parses for hours, and a parser can also exhaust
memory or crash in C code. In the consumer process each of these outlives the poll
interval or kills the worker; the event is redelivered and its partition never moves
again. In a child, each ends in ``UnparseableDocument`` with a reason a person can act
on, and the consumer moves on.

Children come from a forkserver that has ``infra.extract`` imported already, so a child
costs a fork (a few milliseconds), not an interpreter start; plain ``fork`` would copy a
process whose stage threads may hold locks.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
import threading
from collections.abc import Callable
from multiprocessing.context import ForkServerContext
from typing import Any

from domain.errors import DocumentError, UnparseableDocument

from . import extract_text
from .formats import choose_format
from .model import ExtractedText, ExtractLimits, KiB, brief, human_size

__all__ = ["IN_PROCESS_MAX_BYTES", "extract_text_isolated"]

# A child costs 5-13 ms. Plain text, Markdown and HTML up to 64 KiB parse in-process in
# 0.1 ms (text) to 40 ms (Markdown), and the worst inputs found (nested emphasis, deep
# tags) take about 1 s: bounded, so not worth a child. PDF and DOCX always get one.
IN_PROCESS_MAX_BYTES = 64 * KiB
_IN_PROCESS_KINDS = frozenset({"text", "markdown", "html"})

# What the child runs: extract_text, except in tests that swap in a crashing function
# (a module-level function, so it reaches the child by name).
_ENTRY: Callable[..., ExtractedText] = extract_text

_CPU_GRACE_SECONDS = 2  # between SIGXCPU (soft limit) and SIGKILL (hard limit)
_EXIT_GRACE_SECONDS = 5.0  # for a child that has sent its result to exit

_context_lock = threading.Lock()
_context: ForkServerContext | None = None


def _forkserver() -> ForkServerContext:
    global _context
    with _context_lock:
        if _context is None:
            ctx = multiprocessing.get_context("forkserver")
            assert isinstance(ctx, ForkServerContext)
            # Not "__main__" (the default): that is the whole application or pytest.
            ctx.set_forkserver_preload([f"{__package__}._forkserver", __name__])
            _context = ctx
        return _context


def start_forkserver() -> None:
    """Start the forkserver now, so its imports run in their own process while
    this one starts up, instead of on the first large document."""
    import multiprocessing.forkserver

    _forkserver()
    multiprocessing.forkserver.ensure_running()


def _in_process(data: bytes, filename: str, mime_type: str | None, limits: ExtractLimits) -> bool:
    """Cheap cases that need no child: refusals extract_text makes before parsing, and
    small documents of the text family."""
    if not data or len(data) > limits.max_bytes:
        return True
    try:
        kind = choose_format(filename, mime_type).kind
    except DocumentError:
        return True  # unsupported format: extract_text refuses it without parsing
    return kind in _IN_PROCESS_KINDS and len(data) <= IN_PROCESS_MAX_BYTES


def extract_text_isolated(
    data: bytes,
    filename: str,
    mime_type: str | None = None,
    limits: ExtractLimits = ExtractLimits(),
) -> ExtractedText:
    """``extract_text`` under ``limits.cpu_seconds``, ``limits.memory_bytes`` and
    ``limits.wall_seconds``. Exceeding one, or the parser crashing, raises
    ``UnparseableDocument``; anything else behaves exactly as ``extract_text``."""
    if _in_process(data, filename, mime_type, limits):
        return extract_text(data, filename, mime_type, limits)
    return _run_in_child(_ENTRY, (data, filename, mime_type, limits), limits)


def _exit_with_parent() -> None:
    """A child whose worker was killed would parse on unsupervised (the forkserver stays
    up while it runs): a thread waits for the worker's end and kills the child."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return
    sentinel = parent.sentinel

    def watch() -> None:
        multiprocessing.connection.wait([sentinel])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="kbstream-extract-watchdog", daemon=True).start()


def _child(
    conn: multiprocessing.connection.Connection,
    entry: Callable[..., ExtractedText],
    args: tuple[Any, ...],
    cpu_seconds: int,
    memory_bytes: int,
) -> None:
    _exit_with_parent()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash must not litter the cwd
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + _CPU_GRACE_SECONDS))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    message: tuple[str, Any]
    try:
        message = ("ok", entry(*args))
    except MemoryError:
        message = ("memory", None)
    except DocumentError as exc:
        message = ("document", exc.reason)
    except Exception as exc:  # a bug: re-raised in the parent as what it was
        message = ("error", exc)
    try:
        conn.send(message)
    except MemoryError:
        conn.send(("memory", None))
    except Exception as exc:  # an exception that does not pickle
        conn.send(("error", RuntimeError(f"{type(exc).__name__}: {brief(exc)}")))
    conn.close()


def _run_in_child(
    entry: Callable[..., ExtractedText], args: tuple[Any, ...], limits: ExtractLimits
) -> ExtractedText:
    ctx = _forkserver()
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(
        target=_child,
        args=(sender, entry, args, limits.cpu_seconds, limits.memory_bytes),
        name="kbstream-extract",
        daemon=True,
    )
    message: tuple[str, Any] | None = None
    timed_out = False
    try:
        child.start()
        sender.close()  # only the child writes: its exit must read as end-of-file here
        if receiver.poll(limits.wall_seconds):
            with contextlib.suppress(EOFError):  # died without a word: its exit code says how
                message = receiver.recv()
        else:
            timed_out = True
    finally:
        sender.close()
        receiver.close()
        if child.pid is not None:  # started
            if message is None and child.is_alive():
                child.kill()
            child.join(_EXIT_GRACE_SECONDS)
            if child.exitcode is None:  # sent its result but will not exit
                child.kill()
                child.join()
    exitcode = child.exitcode
    child.close()

    if message is None:
        raise _failure(exitcode, timed_out, limits)
    kind, value = message
    if kind == "ok":
        return value  # type: ignore[no-any-return]
    if kind == "document":
        raise UnparseableDocument(value)
    if kind == "memory":
        raise _over_memory(limits)
    raise value


def _over_memory(limits: ExtractLimits) -> UnparseableDocument:
    return UnparseableDocument(
        f"text extraction exceeded {human_size(limits.memory_bytes)} of memory (limit "
        "KBSTREAM_EXTRACT_MEMORY_BYTES); the file may be a decompression bomb — split it "
        "or convert it to plain text"
    )


def _failure(exitcode: int | None, timed_out: bool, limits: ExtractLimits) -> UnparseableDocument:
    if timed_out:
        return UnparseableDocument(
            f"text extraction took longer than {limits.wall_seconds:g} s (limit "
            "KBSTREAM_EXTRACT_WALL_SECONDS) and was stopped; the file may be a decompression "
            "bomb — split or convert it, or index it again when the indexer is less busy"
        )
    if exitcode is not None and exitcode < 0:
        sig = -exitcode
        if sig == signal.SIGXCPU:
            return UnparseableDocument(
                f"text extraction exceeded {limits.cpu_seconds} s of CPU time (limit "
                "KBSTREAM_EXTRACT_CPU_SECONDS); the file may be a decompression bomb — split "
                "it or convert it to plain text"
            )
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        hint = " (out of memory?)" if sig == signal.SIGKILL else ""
        return UnparseableDocument(
            f"the text extractor crashed on this file ({name}{hint}); the file is probably "
            "malformed — re-save or convert it and upload it again"
        )
    return UnparseableDocument(
        f"the text extractor exited with status {exitcode} without a result; the file is "
        "probably malformed — re-save or convert it and upload it again"
    )
