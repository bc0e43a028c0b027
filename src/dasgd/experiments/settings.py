"""Settings have one source: the spec dataclasses' fields. CLI flags, YAML keys and type checks derive from it.

A setting is declared once, as a field of :class:`~dasgd.experiments.spec.RunSpec` or
:class:`~dasgd.experiments.simspec.SimSpec` made with :func:`setting`: its name is the YAML key, its type
annotation the kind checked at the edge, its default the default, and its metadata the help text and how the
flag looks. :func:`add_flags` builds a command's flags from those fields and :func:`values_from_args` reads
them back, so a flag can never be parsed and then dropped: there is no second list to forget it in.

Why plain dataclasses and argparse rather than pydantic: the specs are small, frozen and already validated
with messages that name the flag and the fix (exit code 2); generating argparse from the fields removes the
hand-kept flag and key lists without a new dependency, and keeps those messages as they are.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

__all__ = ["setting", "add_flags", "values_from_args", "flag_of", "kind_of", "cli_fields"]

_SCALARS = {int: "int", float: "float", str: "str", bool: "bool"}


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002 - argparse's own word for it
    *,
    flag: str | None = None,
    metavar: str | None = None,
    repeat: bool = False,
    cli: bool = True,
    default_factory: Any = dataclasses.MISSING,
    compare: bool = True,
) -> Any:
    """A spec field that is also a setting: ``help`` and how its flag looks travel with it.

    Args:
        default: the default value (what YAML and flags fall back to).
        help: the flag's help text.
        flag: the flag's name when it is not ``--`` + the field name with dashes (``--straggler`` for
            ``stragglers``); a bool whose default is True gets ``--no-NAME`` unless named here.
        metavar: the placeholder shown in ``--help``.
        repeat: the flag may be given several times; the values are collected into a list.
        cli: False for settings that only a spec file can give (a mapping, a table).
        default_factory, compare: as in :func:`dataclasses.field`.
    """
    meta = {"help": help, "flag": flag, "metavar": metavar, "repeat": repeat, "cli": cli}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, compare=compare, metadata=meta)
    return dataclasses.field(default=default, compare=compare, metadata=meta)


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are command-line flags."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", False)]


def kind_of(cls: type, name: str) -> str:
    """The scalar kind of setting ``name``: "int", "float", "str" or "bool" (Optional is looked through);
    "other" for a structured setting (a list, a mapping) that its own parser reads."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else hint
    return _SCALARS.get(hint, "other")


def flag_of(cls: type, name: str) -> str:
    """The flag a user types for setting ``name`` of ``cls``."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    if kind_of(cls, name) == "bool" and f.default is True:
        return "--no-" + name.replace("_", "-")
    return "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """Add one flag per setting of ``cls``; each flag's value lands in ``args.<field name>``.

    Every flag defaults to None (not given), so a spec file's value is overridden only by a flag the user
    typed; the field's own default is shown in the help.
    """
    for f in cli_fields(cls):
        kind = kind_of(cls, f.name)
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "" if default in (None, (), "") or kind == "bool" else f" (default {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": meta["help"] + shown}
        if kind == "bool":
            # The flag flips the default: --audit turns a False setting on, --no-batched a True one off.
            kwargs["action"] = "store_false" if default is True else "store_true"
        else:
            if kind in ("int", "float"):
                kwargs["type"] = int if kind == "int" else float
            if meta["metavar"]:
                kwargs["metavar"] = meta["metavar"]
            if meta["repeat"]:
                kwargs["action"] = "append"
        parser.add_argument(flag_of(cls, f.name), **kwargs)


def values_from_args(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The settings of ``cls`` as given on the command line (None where a flag was not given)."""
    return {f.name: getattr(args, f.name) for f in cli_fields(cls)}
