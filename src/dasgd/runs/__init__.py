"""Runs: assembling one run from a spec (real processes or the simulator), its outputs and reports, and plans
of many runs (sweeps, comparisons, the theory sweep).

The public names live in the modules; import them from there."""

__all__: list[str] = []
