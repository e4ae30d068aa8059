"""How tests/parallel.py cuts a suite into work units for pytest-xdist and
orders them, on a small suite collected in-process (pytester)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.parallel import order_units, read_units, write_units

pytest_plugins = ["pytester"]

MODULE_FIXTURE = """
import pytest

@pytest.fixture(scope="module", params=["confluent", "faust"])
def env(request):
    return request.param

@pytest.fixture(scope="module")
def bench():
    return object()

def test_one(env): pass
def test_two(env, bench): pass
def test_three(bench): pass
def test_alone(tmp_path): pass

@pytest.mark.parametrize("n", [1, 2])
def test_alone_too(n): pass

@pytest.mark.xdist_group("shared")
def test_grouped(): pass
"""


def units_of(pytester: pytest.Pytester) -> tuple[list[str], dict[str, str]]:
    items = pytester.inline_genitems()[0]
    units = order_units(items)
    return [i.nodeid for i in items], units


def test_module_fixtures_and_their_params_make_units(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_a=MODULE_FIXTURE)
    pytester.makepyfile(
        test_b="import pytest\n@pytest.mark.xdist_group('shared')\ndef test_b(): pass"
    )
    _, units = units_of(pytester)
    by_unit: dict[str, set[str]] = {}
    for nodeid, unit in units.items():
        by_unit.setdefault(unit, set()).add(nodeid.split("::", 1)[1])
    # one unit per param of the module fixtures a test uses, whichever they are
    assert by_unit["test_a.py::env=0"] == {"test_one[confluent]", "test_two[confluent]"}
    assert by_unit["test_a.py::env=1"] == {"test_one[faust]", "test_two[faust]"}
    assert by_unit["test_a.py"] == {"test_three"}
    # an explicit group spans modules
    assert by_unit["group:shared"] == {"test_grouped", "test_b"}
    # the rest stand alone: a unit each
    for alone in ("test_alone", "test_alone_too[1]", "test_alone_too[2]"):
        assert by_unit[f"test_a.py::{alone}"] == {alone}


def test_heavier_units_go_first_and_a_unit_keeps_its_order(pytester: pytest.Pytester) -> None:
    pytester.mkpydir("unit").joinpath("test_u.py").write_text(
        "def test_u1(): pass\ndef test_u2(): pass\n"
    )
    e2e = pytester.mkpydir("e2e")
    e2e.joinpath("test_e.py").write_text(
        "import pytest\n"
        "@pytest.fixture(scope='module')\n"
        "def pipeline(): return 1\n"
        "def test_e1(pipeline): pass\n"
        "def test_e2(pipeline): pass\n"
        "def test_e_alone(): pass\n"
    )
    pytester.mkpydir("integration").joinpath("test_i.py").write_text("def test_i(): pass\n")
    order, _ = units_of(pytester)
    assert [n.rsplit("::", 1)[1] for n in order] == [
        "test_e1",  # the two tests of one e2e unit, in their order
        "test_e2",
        "test_e_alone",
        "test_i",
        "test_u1",
        "test_u2",
    ]


def test_the_workers_units_reach_the_controller(tmp_path: Path) -> None:
    """xdist's controller sees node ids only; the workers' units reach it by file."""
    units = {"m.py::test_x[0]": "m.py::env=0", "m.py::test_y[0]": "m.py::env=0"}
    write_units(tmp_path, "gw1", units)
    write_units(tmp_path, "gw0", units)
    assert read_units(tmp_path) == units
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gw0.json", "gw1.json"]
