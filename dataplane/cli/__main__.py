"""`python -m dataplane.cli`: the same as `amesh`."""

from dataplane.cli.main import main

main()
