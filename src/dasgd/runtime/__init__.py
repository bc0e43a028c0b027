"""Real-time driving of workers: processes, rendezvous, the training loop, end-of-run drain.

The public names live in the modules; import them from there."""

__all__: list[str] = []
