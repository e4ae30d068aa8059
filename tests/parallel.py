"""Parallel test runs (pytest-xdist, `-n N --dist loadgroup`; scripts/test.sh).

A work unit is what one xdist worker runs from start to end:

- the tests that share module-scoped state (a pipeline a module starts once)
  form one unit per param of those fixtures, so each module fixture is set up
  on one worker only, and its params (the runtimes) may go to two workers;
- tests marked ``xdist_group(name)`` form one unit per name;
- every other test is a unit of its own, run wherever a worker is free.

A worker finishes a unit's module fixtures when the unit ends, not when
pytest leaves the module: the next unit on that worker may come from the same
module, and a pipeline left idle until then holds its processes and some 30
PostgreSQL connections (the server allows 100).

Units are handed out heaviest first (the longest-processing-time rule): the
end-to-end units start at once on every worker, and the many short tests fill
the gaps at the end instead of one long test running alone after the rest.

xdist's own loadgroup scheduler reads the group from a suffix it appends to
the node id, which pytest 9.2 no longer lets it set (pytest-dev/pytest-xdist
#1386: the groups are silently ignored); so the workers write the unit of every
test to a file the controller names, and the scheduler here reads it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

UNITS_KEY = "kbstream_units_dir"  # in workerinput: where a worker writes its units
UNITS_DIR = pytest.StashKey[Path]()  # the controller's copy
UNIT_OF = pytest.StashKey[dict[str, str]]()  # a worker's: node id -> unit
SHARED_SCOPES = ("module", "class", "package")
# rough seconds per test, by suite: enough to hand out the long units first
WEIGHT = {"e2e": 20.0, "integration": 1.0}
DEFAULT_WEIGHT = 0.05


def parallel(config: pytest.Config) -> bool:
    """This process is the controller or a worker of a `--dist loadgroup` run."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        return UNITS_KEY in workerinput
    return (
        config.pluginmanager.hasplugin("xdist")
        and config.getoption("dist") == "loadgroup"
        and bool(config.getoption("tx"))
    )


def shared_unit(item: pytest.Item) -> str | None:
    """The unit ``item`` shares with other tests, or None if it stands alone."""
    marks = [
        m.args[0] if m.args else m.kwargs.get("name") for m in item.iter_markers("xdist_group")
    ]
    if marks:
        return "group:" + "_".join(sorted(map(str, marks)))
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    shared = sorted(
        name
        for name in info.names_closure
        if (defs := info.name2fixturedefs.get(name)) and defs[-1].scope in SHARED_SCOPES
    )
    if not shared:
        return None
    callspec = getattr(item, "callspec", None)
    indices = callspec.indices if callspec is not None else {}
    params = [f"{name}={indices[name]}" for name in shared if name in indices]
    return "::".join([item.nodeid.split("::", 1)[0], *params])


def weight(item: pytest.Item) -> float:
    return WEIGHT.get(Path(str(item.path)).parent.name, DEFAULT_WEIGHT)


def order_units(items: list[pytest.Item]) -> dict[str, str]:
    """Reorder ``items`` unit by unit, heaviest unit first (stable: a unit keeps
    the order pytest gave its tests, grouped by fixture param); returns the unit
    of every node id."""
    units: dict[str, list[pytest.Item]] = {}
    for item in items:
        units.setdefault(shared_unit(item) or item.nodeid, []).append(item)
    ordered = sorted(units.values(), key=lambda unit: sum(map(weight, unit)), reverse=True)
    items[:] = [item for unit in ordered for item in unit]
    return {item.nodeid: name for name, unit in units.items() for item in unit}


# -- hooks -----------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    if parallel(config) and not hasattr(config, "workerinput"):
        config.stash[UNITS_DIR] = Path(tempfile.mkdtemp(prefix="kbstream-units-"))
        config.pluginmanager.register(_XdistHooks(), "kbstream-parallel-xdist")


def pytest_unconfigure(config: pytest.Config) -> None:
    units_dir = config.stash.get(UNITS_DIR, None)
    if units_dir is not None:
        shutil.rmtree(units_dir, ignore_errors=True)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a worker: order the units and tell the controller which test is in which."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None or UNITS_KEY not in workerinput:
        return
    units = config.stash[UNIT_OF] = order_units(items)
    write_units(Path(workerinput[UNITS_KEY]), workerinput["workerid"], units)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """On a worker, after the last test of a unit: finish the module-scoped
    fixtures it used (as pytest does when a fixture's param changes); a later
    test that needs one sets it up again."""
    result = yield
    units = item.config.stash.get(UNIT_OF, None)
    if units is not None and (
        nextitem is None or units.get(nextitem.nodeid) != units.get(item.nodeid)
    ):
        info = item._fixtureinfo  # type: ignore[attr-defined]
        request = item._request  # type: ignore[attr-defined]
        for name in reversed(info.names_closure):  # dependents before what they depend on
            defs = info.name2fixturedefs.get(name)
            if defs and defs[-1].scope in SHARED_SCOPES:
                defs[-1].finish(request)
    return result


def write_units(units_dir: Path, worker: str, units: dict[str, str]) -> None:
    partial = units_dir / f"{worker}.part"
    partial.write_text(json.dumps(units))
    os.replace(partial, units_dir / f"{worker}.json")


def read_units(units_dir: Path) -> dict[str, str]:
    """The units one worker wrote (every worker collects the same tests, or
    xdist stops the run)."""
    written = sorted(units_dir.glob("*.json"))
    assert written, f"no worker wrote its work units to {units_dir}"
    units: dict[str, str] = json.loads(written[0].read_text())
    return units


class _XdistHooks:
    """The controller's side, registered only where xdist is installed."""

    @pytest.hookimpl
    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput[UNITS_KEY] = str(node.config.stash[UNITS_DIR])

    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        return UnitScheduling(config, log)


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # xdist not installed: serial runs only
    LoadScopeScheduling = object


class UnitScheduling(LoadScopeScheduling):  # type: ignore[misc,valid-type]
    """xdist's scope scheduler with the workers' units as scopes, handed out in
    collection order (which the workers made heaviest first)."""

    def __init__(self, config: pytest.Config, log: Any = None) -> None:
        super().__init__(config, log)
        self._units: dict[str, str] | None = None
        config.option.loadscopereorder = False  # most tests first would undo the order

    def _split_scope(self, nodeid: str) -> str:
        if self._units is None:  # asked once all workers have collected
            self._units = read_units(self.config.stash[UNITS_DIR])
        return self._units.get(nodeid, nodeid)
