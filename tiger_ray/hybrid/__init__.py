"""TIGER + dual encoder (LIGER-style): generative and dense candidates, re-ranked by both models."""
