"""Where the controller keeps its map: a file, or etcd (a real etcd 3.4
member on loopback, as in tests/test_etcdstore.py)."""

from __future__ import annotations

import time

import pytest

from dataplane.shells.mapkeep import Conflict, EtcdKeep, FileKeep, Following, KeepError, Retrying, keeper
from dataplane.lab.topology import load
from tests import test_etcdstore
from tests.test_etcdstore import free_port
from tests.test_topology import DEFAULT, variant

etcd = test_etcdstore.etcd
"""A real etcd member on loopback (the fixture of the etcd store's tests)."""


def test_file_keep_replaces_the_map_whole(tmp_path):
    k = FileKeep(tmp_path / "ctl-map.json")
    assert k.load() is None
    k.keep(b"m1")
    k.keep(b"m2")
    assert k.load() == b"m2" and not (tmp_path / "ctl-map.tmp").exists()
    with pytest.raises(KeepError, match="map file not written"):
        FileKeep(tmp_path / "no-such-dir" / "ctl-map.json").keep(b"m")


def test_the_topology_chooses_the_keeper(tmp_path):
    assert isinstance(keeper(load(DEFAULT), tmp_path / "m.json").inner, FileKeep)
    k = keeper(load(variant(tmp_path, 'store = "embedded"', 'store = "etcd"')), tmp_path / "m.json")
    assert isinstance(k.inner, EtcdKeep) and k.describe()["key"] == "/amesh/default/map"
    k.inner.close()


def test_a_refused_map_is_due_again_until_it_is_kept(tmp_path):
    """The newest map the store refused comes back for another try every
    `every` seconds; a newer map replaces it; once kept nothing is due.
    The store here is a map file whose directory appears later."""
    where = tmp_path / "later"
    k = Retrying(FileKeep(where / "ctl-map.json"), every=0.5)
    assert k.due(0.0) is None
    for now, data in ((1.0, b"m1"), (1.5, b"m2")):
        with pytest.raises(KeepError):
            k.keep(data, now)
    assert k.due(1.9) is None and k.due(2.0) == b"m2"
    where.mkdir()
    k.keep(k.due(2.0), 2.0)
    assert k.load() == b"m2" and k.due(9.0) is None


def test_a_lost_compare_and_swap_is_not_retried(etcd):
    a, b = Retrying(EtcdKeep([etcd.url], "/lost")), EtcdKeep([etcd.url], "/lost")
    try:
        a.load()
        b.load()
        b.keep(b"theirs")
        with pytest.raises(Conflict):
            a.keep(b"ours", 0.0)
        assert a.due(9.0) is None
    finally:
        a.inner.close()
        b.close()


def test_etcd_keep_writes_by_compare_and_swap(etcd):
    """A keeper writes from the revision it last read or wrote: a second
    writer that moved the key makes its next write lose (counted by the
    shell as a conflict), with the winner's revision learnt."""
    a = EtcdKeep([etcd.url], "/k")
    try:
        assert a.load() is None and a.revision == 0
        a.keep(b"m1")
        first = a.revision
        assert first > 0
        b = EtcdKeep([etcd.url], "/k")
        assert b.load() == b"m1" and b.revision == first
        b.keep(b"m2")
        with pytest.raises(Conflict, match=f"from revision {first} to {b.revision}"):
            a.keep(b"m3")
        assert a.revision == b.revision
        b.close()
        assert EtcdKeep([etcd.url], "/k").load() == b"m2"
    finally:
        a.close()


def test_etcd_keep_skips_an_endpoint_that_does_not_answer(etcd):
    dead = f"http://127.0.0.1:{free_port()}"
    k = EtcdKeep([dead, etcd.url], "/skip", timeout=1.0)
    try:
        k.keep(b"m")
        assert k.describe()["endpoint"] == etcd.url and k.revision > 0
    finally:
        k.close()
    k = EtcdKeep([dead], "/skip", timeout=0.5)
    try:
        with pytest.raises(KeepError, match="etcd did not answer: 127.0.0.1"):
            k.load(wait=1.0)
    finally:
        k.close()


def test_peer_controllers_propose_from_one_revision_and_follow_the_winner(etcd):
    """Two shared controllers propose from the same revision: one wins, the
    other learns the winner's map in the answer; a follower thread started
    at the first revision sees exactly the newer map, and stops on close."""
    a, b = EtcdKeep([etcd.url], "/peers"), EtcdKeep([etcd.url], "/peers")
    try:
        a.keep(b"m1")
        r1 = a.revision
        follow = Following([etcd.url], "/peers", r1)
        won = a.propose(b"m2-a", r1)
        lost = b.propose(b"m2-b", r1)
        assert won.won and won.stored.value == b"m2-a" and won.stored.revision > r1
        assert not lost.won and lost.stored == won.stored and b.revision == won.stored.revision
        deadline = time.monotonic() + 5
        got = []
        while not got and time.monotonic() < deadline:
            got = follow.drain()
            time.sleep(0.02)
        follow.close()
        assert got == [won.stored] and follow.error is None
        assert not follow._thread.is_alive()
    finally:
        a.close()
        b.close()


def test_a_follower_of_an_endpoint_that_never_answers_stops_on_close():
    """It keeps trying (read, back-off, read) and brings nothing; `close`
    ends the thread all the same (a controller's stop must not hang)."""
    follow = Following([f"http://127.0.0.1:{free_port()}"], "/none", 0)
    time.sleep(0.3)
    follow.close(wait=5.0)
    assert not follow._thread.is_alive() and follow.drain() == []
