"""The I/O shells around the core: sockets, processes and their loops. Each
one turns the core's events into system calls and nothing more."""
