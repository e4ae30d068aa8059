"""Preloaded by the extraction forkserver (see isolated.py) and imported nowhere else.

multiprocessing re-runs the parent's main module in every child it starts: under
``python -m kbstream.cli`` that imports the whole application (database, Milvus,
Kafka clients; about a second of CPU) once per document, where the fork itself costs
5 ms. Extraction children need nothing from the main module: their target is
``infra.extract.isolated._child``, pickled by module name. So in the forkserver, and
hence in its children only, the main-module fix-up is turned off.

These are private functions of multiprocessing.spawn (Python 3.8 to 3.14). Should a
later Python rename them, nothing is patched and children re-run the main module again:
slower, still correct.
"""

from __future__ import annotations

import sys
from multiprocessing import forkserver, spawn


def _leave_main_alone(_: str) -> None:
    return None


def _in_forkserver() -> bool:
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_filename == forkserver.__file__ and frame.f_code.co_name == "main":
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


if _in_forkserver():
    for _name in ("_fixup_main_from_name", "_fixup_main_from_path"):
        if hasattr(spawn, _name):
            setattr(spawn, _name, _leave_main_alone)
