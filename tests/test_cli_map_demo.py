"""`amesh map plan` and `amesh demo` from the command line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dataplane.cli.main import main


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def test_plan_fail_json():
    res = invoke("map", "plan", "--service", "B=ba,bb,bc,bd", "--service", "A=aa,ab", "--fail", "bb",
                 "--buckets", "4096", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    b = out["B"]
    assert b["moved"] == b["before"]["bb"] and b["collateral"] == 0 and b["to_secondary"] == b["moved"]
    assert b["after"]["bb"] == 0 and out["A"]["moved"] == 0


def test_plan_add_text():
    res = invoke("map", "plan", "--service", "B=ba,bb,bc,bd", "--add", "be", "--buckets", "4096")
    assert res.exit_code == 0
    assert "be" in res.output and "moved" in res.output


@pytest.mark.parametrize("args,needle", [
    (["--service", "B"], "SERVICE=inst1"),
    (["--service", "B=ba,ba"], "named twice"),
    (["--service", "B=ba", "--fail", "zz"], "no instance named 'zz'"),
    (["--service", "B=ba", "--service", "A=aa", "--add", "x"], "say which service"),
    (["--service", "B=ba", "--buckets", "0"], "--buckets"),
])
def test_plan_errors(args, needle):
    res = invoke("map", "plan", *args)
    assert res.exit_code == 2 and needle in res.output


def test_demo_json():
    res = invoke("simulate", "--story", "--json", "--segments", "6", "--fail-after", "3")
    assert res.exit_code == 0
    runs = json.loads(res.output)
    assert [r["survived"] for r in runs] == [True, False]


def test_demo_rejects_bad_failure_point():
    res = invoke("simulate", "--story", "--segments", "4", "--fail-after", "4")
    assert res.exit_code == 2


def test_demo_host_needs_a_lab_with_machines():
    """Refused before any lab is built: the default lab has no [machines]."""
    res = CliRunner().invoke(main, ["demo", "--host"])
    assert res.exit_code == 1
    assert "declares no [machines]" in res.output or "run it as root" in res.output, res.output


def test_simulate_a_failing_seed_prints_the_command_that_replays_it():
    res = CliRunner().invoke(main, ["simulate", "--seed", "5", "--steps", "2", "--policy", "off"])
    assert res.exit_code == 1
    assert "flows_survive: 1 VIOLATIONS" in res.output
    assert "replay: amesh simulate --seed 5 --steps 2 --policy off" in res.output


def test_simulate_a_passing_seed_exits_0():
    res = invoke("simulate", "--seed", "5", "--steps", "2", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["ok"] is True


def test_simulate_with_two_controllers():
    res = invoke("simulate", "--seed", "2", "--steps", "1", "--controllers", "2", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["ok"] is True and out["controllers"] == 2
    assert out["faults"][0][1] == "ctl_crash"                  # a controller fault, feasible with two
