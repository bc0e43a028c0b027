"""Typed, frozen run specs validated once at the edge."""

from __future__ import annotations

from dasgd.experiments.spec import RunSpec, SpecError, load_spec_file, parse_straggler, resolve_spec

__all__ = ["RunSpec", "SpecError", "load_spec_file", "parse_straggler", "resolve_spec"]
