"""Wire messages and codec, the staleness ledger, topologies, theory formulas (the bottom layer).

The public names live in the modules; import them from there."""

__all__: list[str] = []
