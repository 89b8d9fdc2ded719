"""Small real client and server programs run inside lab hosts (by the demo
and the tests): `serve` (threaded static HTTP), `fetch` (concurrent HTTP
downloads with sha256), `ping` (ICMP echo; the hosts have no ping binary)."""
