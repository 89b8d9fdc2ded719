"""Testing a chain from your own repository: the pytest plugin's fixtures
(`dataplane.testing.plugin`, registered under the `pytest11` entry point,
so installing affinity-mesh is all it takes) and the masked packet
comparison they use (`assert_packets`, `HOST_LINK`, `FABRIC`)."""

from dataplane.testing.compare import FABRIC, HOST_LINK, Masks, assert_packets, diff

__all__ = ["FABRIC", "HOST_LINK", "Masks", "assert_packets", "diff"]
