"""A real pytest-xdist run (`-n 2 --dist loadgroup`, as scripts/test.sh starts
the suite) with tests/parallel.py: a module fixture is set up once per param,
all its tests on one worker, and finished when they are done, not when the
worker leaves the module. xdist's own loadgroup stopped grouping silently
under pytest 9.2 (pytest-dev/pytest-xdist#1386); this fails if ours does."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[2]

SUITE = """
import os
import pytest

ALIVE = set()

def log(line):
    with open(os.environ["EVENTS"], "a") as f:
        f.write(f"{os.environ.get('PYTEST_XDIST_WORKER')} {line}\\n")

@pytest.fixture(scope="module", params=["confluent", "faust"])
def env(request):
    log(f"setup {request.param}")
    ALIVE.add(request.param)
    yield request.param
    ALIVE.discard(request.param)

@pytest.mark.parametrize("n", range(6))
def test_with_env(env, n):
    pass

@pytest.mark.parametrize("n", range(6))
def test_alone(n):
    log(f"alone {sorted(ALIVE)}")
"""


def test_module_fixture_params_each_run_on_one_worker(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("xdist")
    events = tmp_path / "events.txt"
    monkeypatch.setenv("EVENTS", str(events))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    pytester.makeconftest('pytest_plugins = ("tests.parallel",)')
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest_subprocess(
        "-n", "2", "--dist", "loadgroup", "-v", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=18)
    ran = re.findall(
        r"\[(gw\d)\] \[\s*\d+%\] PASSED \S+::(\w+)\[(\w+)-?(\d*)\]", result.stdout.str()
    )
    workers: dict[str, set[str]] = {}
    for worker, test, first, _ in ran:
        if test == "test_with_env":
            workers.setdefault(first, set()).add(worker)
    assert workers.keys() == {"confluent", "faust"}, result.stdout.str()
    assert all(len(w) == 1 for w in workers.values()), workers
    lines = events.read_text().splitlines()
    # each param's module fixture set up once, on the worker that ran its tests
    setups = [line.split()[1:] for line in lines if " setup " in line]
    assert sorted(p for _, p in setups) == ["confluent", "faust"], lines
    # and finished before the worker went on with the module's other tests
    alone = [line for line in lines if " alone " in line]
    assert len(alone) == 6 and all(line.endswith("alone []") for line in alone), lines
