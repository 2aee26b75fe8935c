"""Data: canonical items/sequences tables and the leave-one-out split every stage shares."""
