"""Command-line flags from settings dataclasses: name, type, default, help and choices of every
flag come from its field (`config.setting`), so no flag is written by hand.

A command's own settings (`Settings.section == ""`) become typed flags, `--batch-size 8`, with
booleans as `--echo/--no-echo`. The sections of a run (`[model]`, `[optim]`, `[train]`,
`[runtime]`) become `--section.field VALUE` overrides: they are kept as the text given and
applied on top of a preset or a saved run by `RunConfig.override`, which parses and checks them.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TypeVar

from .config import ConfigError, Settings, base_type, choices

S = TypeVar("S", bound=Settings)


def add_settings(parser: argparse.ArgumentParser, cls: type[Settings]) -> None:
    """A flag (or a positional argument) for every field of the command settings `cls`."""
    hints = cls.hints()
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = base_type(hints[f.name])
        options = choices(hints[f.name])
        helptext = f.metadata["help"]
        required = f.default is dataclasses.MISSING
        if f.metadata.get("positional"):
            nargs = f.metadata.get("nargs")  # "+": one or more values, a list
            parser.add_argument(f.name, nargs=nargs, choices=options, help=helptext)
            continue
        if kind is bool:
            parser.add_argument(
                cls.flag(f.name),
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=f.default,
                help=helptext,
            )
            continue
        if not required and f.default is not None and not options:
            helptext += f" (default: {f.default})"
        parser.add_argument(
            cls.flag(f.name),
            dest=f.name,
            type=f.metadata.get("parse", kind),
            choices=options,
            default=None if required else f.default,
            required=required,
            metavar=f.metadata.get("metavar"),
            help=helptext,
        )


def settings(cls: type[S], args: argparse.Namespace) -> S:
    """The settings `cls` the parsed `args` give (validated by `cls`)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


def add_sections(parser: argparse.ArgumentParser, *sections: type[Settings]) -> None:
    """`--section.field VALUE` for every field of the given run sections, listed in the help."""
    for cls in sections:
        group = parser.add_argument_group(
            f"[{cls.section}] settings", (cls.__doc__ or "").splitlines()[0]
        )
        hints = cls.hints()
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            options = choices(hints[f.name])
            kind = base_type(hints[f.name])
            group.add_argument(
                cls.flag(f.name),
                dest=f"{cls.section}.{f.name}",
                default=argparse.SUPPRESS,
                metavar=_metavar(options, kind),
                help=f.metadata["help"],
            )


def _metavar(options: tuple | None, kind: type) -> str:
    if options:
        return "{" + ",".join(options) + "}"
    return "N,N,..." if kind is tuple else kind.__name__.upper()


def overrides(args: argparse.Namespace) -> dict[str, str]:
    """The `--section.field` values given, {"model.n_layers": "4", ...}, in flag order."""
    return {key: value for key, value in vars(args).items() if "." in key}


def override_argv(args: argparse.Namespace) -> list[str]:
    """The overrides as they would be written on the command line (for reports)."""
    return [item for key, value in overrides(args).items() for item in (f"--{key}", value)]


def reject_extra(extra: list[str], sections: bool) -> None:
    """Arguments no flag took: an unknown `--section.field` is named as such."""
    if not extra:
        return
    if not sections:
        raise ConfigError(f"unrecognized arguments: {' '.join(extra)}")
    first = extra[0]
    if first.startswith("--") and "." in first:
        raise ConfigError(f"unknown flag {first.partition('=')[0]}")
    raise ConfigError(f"unrecognized argument {first}")
