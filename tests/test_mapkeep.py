"""Where the controller keeps its map: a file, or etcd (a real etcd 3.4
member on loopback, as in tests/test_etcdstore.py)."""

from __future__ import annotations

import pytest

from dataplane.shells.mapkeep import Conflict, EtcdKeep, FileKeep, KeepError, keeper
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
    assert isinstance(keeper(load(DEFAULT), tmp_path / "m.json"), FileKeep)
    k = keeper(load(variant(tmp_path, 'store = "embedded"', 'store = "etcd"')), tmp_path / "m.json")
    assert isinstance(k, EtcdKeep) and k.describe()["key"] == "/amesh/default/map"
    k.close()


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
