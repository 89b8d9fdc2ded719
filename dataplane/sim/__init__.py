"""The core in one process on a simulated clock and network."""
