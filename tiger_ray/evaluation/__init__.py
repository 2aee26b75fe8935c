"""Evaluation: leave-one-out full-ranking metrics shared by TIGER and the ANN baseline."""
