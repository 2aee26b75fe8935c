"""Helpers shared by the test suite: synthetic runs small enough for seconds-long tests."""
