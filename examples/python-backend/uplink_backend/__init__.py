"""A small uplink backend in Python, written from proto/ and
docs/PROTOCOL.md alone."""
