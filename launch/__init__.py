"""Experiment drivers, one per make target, run from the repository root as `python -m launch.NAME`."""
