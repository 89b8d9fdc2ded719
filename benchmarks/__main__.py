"""Entry point of `make bench`: every benchmark, one JSON file."""

import json

from benchmarks import core, sync

results = {"core": core.main(), "sync": sync.main()}
core.OUT.mkdir(exist_ok=True)
(core.OUT / "results.json").write_text(json.dumps(results, indent=1))
print(f"\nwritten {core.OUT / 'results.json'}")
