"""The sans-IO protocol core: bytes, events and `now` in; bytes, events and deadlines out.

Nothing in this package may import trio, socket, ssl, os, time or a logger
(tests/test_proto_purity.py enforces it).
"""
