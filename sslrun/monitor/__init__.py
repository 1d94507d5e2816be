"""Monitors: what a run writes to TensorBoard while it trains (tags are listed in the README)."""
