"""Semantic IDs: an RQ-VAE turns item embeddings into 3 codes; a 4th token makes IDs unique."""
