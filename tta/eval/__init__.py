"""Evaluation: metrics accumulated along a stream, the config runner, and report writers."""
