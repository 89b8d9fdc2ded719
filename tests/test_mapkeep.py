"""Where the controller keeps its map: a file, or etcd (a real etcd 3.4
member on loopback, as in tests/test_etcdstore.py)."""

from __future__ import annotations

import pytest

from dataplane.shells.mapkeep import Conflict, EtcdKeep, FileKeep, KeepError, Retrying, keeper
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
