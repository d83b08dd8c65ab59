"""Plumbing around the loop in train.py: configuration, distributed set-up,
checkpoints, metrics and logging. The loop itself lives in train.py."""
