"""Transports: the Transport protocol, in-process, torch.distributed and split-plane endpoints.

The public names live in the modules; import them from there."""

__all__: list[str] = []
