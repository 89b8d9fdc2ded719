"""Failure domains: a bucket's secondary is kept off its primary's host."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from dataplane.cli.main import main
from dataplane.core.mapdiff import lost, plan
from dataplane.core.servicemap import Instance, InstanceState, MapError, ServiceMap

BUCKETS = 512


@st.composite
def placements(draw, min_hosts: int = 2) -> list[tuple[str, str]]:
    """2..10 instances, each on one of `min_hosts`..4 hosts, every host used."""
    hosts = [f"h{i}" for i in range(draw(st.integers(min_hosts, 4)))]
    n = draw(st.integers(len(hosts), 10))
    names = [f"i{k}" for k in range(n)]
    where = hosts + [draw(st.sampled_from(hosts)) for _ in range(n - len(hosts))]
    return list(zip(names, draw(st.permutations(where))))


def build(placed: list[tuple[str, str]], anti_affinity: bool = True, replicas: int = 2,
          states: dict[str, InstanceState] | None = None) -> ServiceMap:
    m = ServiceMap(buckets=BUCKETS, replicas=replicas, anti_affinity=anti_affinity)
    m.add_service("B", [Instance(n, state=(states or {}).get(n, InstanceState.ACTIVE), host=h)
                        for n, h in placed])
    return m


def colocated(m: ServiceMap) -> int:
    t = m.table("B")
    return sum(1 for b in range(m.buckets)
               if len(c := t.candidates(b)) > 1 and m.instance(c[0]).machine == m.instance(c[1]).machine)


@settings(max_examples=40, deadline=None)
@given(placements(), st.integers(2, 3), st.data())
def test_no_bucket_has_primary_and_secondary_on_one_host(placed, replicas, data):
    """With two or more hosts holding eligible instances, whatever else is
    dead or joining, no bucket's primary and secondary share a host."""
    states = {n: data.draw(st.sampled_from([InstanceState.ACTIVE, InstanceState.JOINING,
                                            InstanceState.DEAD]), label=n) for n, _ in placed}
    eligible_hosts = {h for n, h in placed if states[n] != InstanceState.DEAD}
    m = build(placed, replicas=replicas, states=states)
    if len(eligible_hosts) >= 2:
        assert colocated(m) == 0
    assert m.table("B").names == sorted(n for n, _ in placed if states[n] != InstanceState.DEAD)


def test_control_without_anti_affinity_has_co_located_pairs():
    placed = [("ba", "h1"), ("bb", "h1"), ("bc", "h2"), ("bd", "h2")]
    assert colocated(build(placed)) == 0
    off = build(placed, anti_affinity=False)
    assert colocated(off) > BUCKETS // 5   # about 1/3 with plain HRW
    plain = build([(n, "") for n, _ in placed])
    assert off.table_digest("B") == plain.table_digest("B")   # hosts ignored when off


@settings(max_examples=25, deadline=None)
@given(placements(), st.data())
def test_a_failure_goes_to_the_secondary_and_moves_nothing_else(placed, data):
    """From a healthy map, or one that lost whole hosts, an instance dying
    hands the buckets it led to their secondaries and moves no other
    primary; dying instances of a whole host likewise."""
    hosts = sorted({h for _, h in placed})
    lost_hosts = data.draw(st.sets(st.sampled_from(hosts), max_size=len(hosts) - 1), label="lost hosts")
    states = {n: InstanceState.DEAD for n, h in placed if h in lost_hosts}
    alive = [n for n, _ in placed if n not in states]
    victims = data.draw(st.one_of(
        st.sampled_from(alive).map(lambda n: {n}),
        st.sampled_from(sorted({h for n, h in placed if n in alive})).map(
            lambda h: {n for n, hh in placed if hh == h})), label="victims")
    m = build(placed, states=states)
    after = build(placed, states={**states, **dict.fromkeys(victims, InstanceState.DEAD)})
    t0, t1 = m.table("B"), after.table("B")
    for b in range(BUCKETS):
        c0, c1 = t0.candidates(b), t1.candidates(b)
        if c0[0] not in victims:
            assert c1[0] == c0[0]                      # zero collateral
        elif len(c0) > 1 and c0[1] not in victims:
            assert c1[0] == c0[1]                      # to the former secondary


@settings(max_examples=25, deadline=None)
@given(placements(), st.data())
def test_a_non_primary_failure_never_moves_a_primary(placed, data):
    """Whatever has failed before, an instance dying moves only the
    buckets it led."""
    names = [n for n, _ in placed]
    dead = data.draw(st.sets(st.sampled_from(names), max_size=len(names) - 2), label="dead")
    victim = data.draw(st.sampled_from(sorted(set(names) - dead)), label="victim")
    m = build(placed, states=dict.fromkeys(dead, InstanceState.DEAD))
    after = build(placed, states=dict.fromkeys(dead | {victim}, InstanceState.DEAD))
    t0, t1 = m.table("B"), after.table("B")
    for b in range(BUCKETS):
        if t0.candidates(b)[0] != victim:
            assert t1.candidates(b)[0] == t0.candidates(b)[0]


@settings(max_examples=25, deadline=None)
@given(placements(), st.data())
def test_a_rejoining_instance_moves_nothing_until_active(placed, data):
    """Make before break holds with hosts too: the primaries of a map with
    an instance JOINING are those of the map with it DEAD, and it is the
    secondary of every bucket it leads once ACTIVE."""
    joiner = data.draw(st.sampled_from([n for n, _ in placed]))
    dead, joining, active = (build(placed, states={joiner: s}).table("B")
                             for s in (InstanceState.DEAD, InstanceState.JOINING, InstanceState.ACTIVE))
    for b in range(BUCKETS):
        if len(dead.candidates(b)):
            assert joining.candidates(b)[0] == dead.candidates(b)[0]
        if active.candidates(b)[0] == joiner and len(placed) > 1:
            assert joining.candidates(b)[1] == joiner


def test_without_hosts_the_map_is_the_one_before_hosts():
    """Every instance on its own host, or all hosts distinct: plain HRW, the
    document carries no host field and no anti_affinity key."""
    names = ["ba", "bb", "bc", "bd"]
    a = ServiceMap(buckets=BUCKETS)
    a.add_service("B", names)
    b = build([(n, f"m{n}") for n in names])
    assert a.table_digest("B") == b.table_digest("B")
    doc = a.to_dict()
    assert "anti_affinity" not in doc and all("host" not in i for i in doc["services"]["B"])


def test_hosts_and_the_switch_survive_the_document():
    m = build([("ba", "h1"), ("bb", "h1"), ("bc", "h2")], anti_affinity=False)
    back = ServiceMap.from_json(m.to_json())
    assert back == m and not back.anti_affinity and back.instance("bb").host == "h1"
    doc = json.loads(build([("ba", "h1"), ("bb", "h1"), ("bc", "h2")]).to_json())
    doc["services"]["B"][0]["host"] = "Bad Host"
    with pytest.raises(MapError, match=r"services.B\[0\].host: 'Bad Host' must match"):
        ServiceMap.from_dict(doc)
    doc["services"]["B"][0]["host"] = "h1"
    doc["anti_affinity"] = "no"
    with pytest.raises(MapError, match="anti_affinity: expected a bool"):
        ServiceMap.from_dict(doc)


def test_plan_fail_host_loses_nothing_with_anti_affinity():
    services = {"B": ["ba", "bb", "bc", "bd"]}
    hosts = {"ba": "h1", "bb": "h1", "bc": "h2", "bd": "h2"}
    before, after, diffs = plan(services, [], [], BUCKETS, 2, hosts, ["h1"])
    assert not after.is_alive("ba") and not after.is_alive("bb") and after.is_alive("bc")
    assert lost(before, {"ba", "bb"}) == {"B": 0}
    assert diffs["B"].collateral == 0 and diffs["B"].to_secondary == diffs["B"].moved
    off, _, _ = plan(services, [], [], BUCKETS, 2, hosts, ["h1"], anti_affinity=False)
    assert lost(off, {"ba", "bb"})["B"] == colocated_on(off, "h1") > 0
    with pytest.raises(ValueError, match="no instance is on host 'h9'"):
        plan(services, [], [], BUCKETS, 2, hosts, ["h9"])


def colocated_on(m: ServiceMap, host: str) -> int:
    t = m.table("B")
    return sum(1 for b in range(m.buckets)
               if all(m.instance(n).machine == host for n in t.candidates(b)[:2]))


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_cli_plan_fail_host():
    args = ["map", "plan", "--service", "B=ba@h1,bb@h1,bc@h2,bd@h2", "--service", "A=aa@h1,ab@h2",
            "--fail-host", "h1", "--buckets", "1024", "--json"]
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["B"]["lost"] == 0 and out["A"]["lost"] == 0
    assert out["B"]["after"]["ba"] == out["B"]["after"]["bb"] == 0 and out["B"]["moved"] > 0
    off = json.loads(invoke(*args, "--no-anti-affinity").output)
    assert off["B"]["lost"] > 0 and off["A"]["lost"] == 0     # A's pair always spans two hosts
    text = invoke(*args[:-1])
    assert text.exit_code == 0 and "lost 0" in text.output


@pytest.mark.parametrize("args,needle", [
    (["--service", "B=ba@,bb"], "expected NAME@HOST"),
    (["--service", "B=ba@h1,bb", "--fail-host", "h2"], "no instance is on host 'h2'"),
])
def test_cli_plan_host_errors(args, needle):
    res = invoke("map", "plan", *args)
    assert res.exit_code != 0 and needle in res.output


def test_lost_counts_primary_and_secondary_only():
    """State is mirrored to the secondary alone, so with 3 candidates a
    bucket is lost when its first two die, whatever the third."""
    m = build([("ba", "h1"), ("bb", "h2"), ("bc", "h3")], replicas=3)
    t = m.table("B")
    pairs = {(t.names[p], t.names[s]) for p, s in zip(t.ranks[0], t.ranks[1])}
    for p, s in pairs:
        want = sum(1 for b in range(BUCKETS) if t.candidates(b)[:2] in ([p, s], [s, p]))
        assert lost(m, {p, s})["B"] == want > 0
    assert lost(m, {"ba"})["B"] == 0
    single = build([("ba", "h1")])
    assert lost(single, {"ba"})["B"] == BUCKETS and lost(single, set())["B"] == 0


def test_cli_plan_from_a_topology(tmp_path):
    """--topology takes the services, [machines] and buckets of a lab file."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "labs" / "default.toml").read_text()
    lab = tmp_path / "lab.toml"
    lab.write_text(text.replace("[controller]", '[machines.h1]\nnodes = ["aa", "ba", "bb"]\n'
                                '[machines.h2]\nnodes = ["ab", "bc"]\n\n[controller]', 1))
    out = json.loads(invoke("map", "plan", "--topology", str(lab), "--fail-host", "h1", "--json").output)
    assert out["B"]["buckets"] == 4096 and out["B"]["lost"] == 0 and out["A"]["lost"] == 0
    assert out["B"]["after"] == {"ba": 0, "bb": 0, "bc": 4096}
    off = json.loads(invoke("map", "plan", "--topology", str(lab), "--fail-host", "h1", "--json",
                            "--no-anti-affinity").output)
    assert off["B"]["lost"] > 0
    for args, needle in ((["--topology", str(lab), "--service", "B=x"], "not both"),
                         ([], "give the services"),
                         (["--topology", str(tmp_path / "none.toml")], "cannot read")):
        res = invoke("map", "plan", *args)
        assert res.exit_code != 0 and needle in res.output
