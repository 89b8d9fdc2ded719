"""The sans-I/O core: hashing, the header, the map, flow tables, services,
the nodes and the sync and control protocols. Bytes and events in, events
out; nothing here opens a socket, reads a clock or touches a file."""
