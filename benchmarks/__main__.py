"""Entry point of `make bench`."""

from benchmarks.core import main

main()
