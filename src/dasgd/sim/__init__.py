"""The discrete-event simulator: event queue, virtual clock, compute-time and network models, failures.

It drives the same workers as real runs. The public names live in the modules; import them from there."""

__all__: list[str] = []
