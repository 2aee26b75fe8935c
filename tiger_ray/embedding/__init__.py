"""Embedding: item text -> sentence-encoder vectors, sharded over Ray Data encoder actors."""
