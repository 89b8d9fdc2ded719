"""Small programs the lab tests run inside namespaces (as real clients)."""
