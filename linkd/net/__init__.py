"""trio shells around the protocol core: TLS, connections, reconnection."""
