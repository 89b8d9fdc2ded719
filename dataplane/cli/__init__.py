"""`amesh`, the command line: `main` is the group, one module per family."""
