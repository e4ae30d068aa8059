"""A real pytest-xdist run (`-n 2 --dist loadgroup`, as scripts/test.sh starts
the suite) with tests/parallel.py: a module fixture is set up once per param,
all its tests on one worker. xdist's own loadgroup stopped grouping silently
under pytest 9.2 (pytest-dev/pytest-xdist#1386); this fails if ours does."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[2]

SUITE = """
import os
import pytest

@pytest.fixture(scope="module", params=["confluent", "faust"])
def env(request):
    with open(os.environ["SETUPS"], "a") as f:
        f.write(f"{request.param} {os.environ.get('PYTEST_XDIST_WORKER')}\\n")
    return request.param

@pytest.mark.parametrize("n", range(6))
def test_with_env(env, n):
    pass

@pytest.mark.parametrize("n", range(6))
def test_alone(n):
    pass
"""


def test_module_fixture_params_each_run_on_one_worker(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("xdist")
    setups = tmp_path / "setups.txt"
    monkeypatch.setenv("SETUPS", str(setups))
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
    # each param's module fixture set up once, on the worker that ran its tests
    lines = setups.read_text().splitlines()
    assert Counter(line.split()[0] for line in lines) == {"confluent": 1, "faust": 1}, lines
