"""Entry point of `make bench`: every benchmark, one JSON file."""

import json
import os

from benchmarks import core, evict, scale, sync

results = {"core": core.main(), "sync": sync.main(), "scale": scale.main(), "evict": evict.main()}
if os.geteuid() == 0:
    from benchmarks import failover, fwd, lab, mapwrite, plot, scrape

    results["forwarding"] = fwd.main()
    results["lab"] = lab.main()
    results["failover"] = failover.main()
    results["scrape"] = scrape.main()
    results["mapwrite"] = mapwrite.main()
    results["plot"] = str(plot.main())
else:
    print("\n(forwarding rate, lab goodput, failover gap and plot skipped: they need root)")
core.OUT.mkdir(exist_ok=True)
(core.OUT / "results.json").write_text(json.dumps(results, indent=1))
print(f"\nwritten {core.OUT / 'results.json'}")
