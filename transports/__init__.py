"""Transports: ways for sync messages to travel between nodes (memory for tests; libp2p and HTTP)."""
