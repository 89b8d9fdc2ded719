"""Golden input/expected pcap pairs for the lab (regenerate: `make golden`)."""
