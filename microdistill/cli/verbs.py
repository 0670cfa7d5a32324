"""What every verb module shares: flags generated from the option classes, and the one-line failure.

A verb takes a config as a parameter whose default says which of its fields are flags:

    @verb
    def train(data: Path = typer.Option(...), cfg: TrainConfig = Flags(TrainConfig), quiet: bool = ...):
        ...

`verb` replaces `cfg` by one typer option per field, named `--field-name`, typed, defaulted and
explained as the field (core/options.py `option`), and calls the verb with the config built from
them; the verb's other parameters (folders, --quiet, --json) stay as written. A default and its
help are so written once, in the option class.
"""

from __future__ import annotations

import inspect
import sys
import types
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Union, get_args, get_origin

import typer

from microdistill.core.errors import UserError
from microdistill.core.options import Described


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    sys.exit(2)


@dataclass(frozen=True)
class Flags:
    """A config's share of a verb's flags, as the default of the verb's parameter that receives it."""

    cls: type  # an Options dataclass
    only: tuple[str, ...] | None = None  # the fields given as flags (None: all but `nested`)
    # field -> click declaration where the flag is not --field-name: "--label", "--eval-teacher/--no-eval-teacher",
    # or an off switch alone, " /--no-teacher"
    names: Mapping[str, str] = field(default_factory=dict)
    nested: Mapping[str, Flags] = field(default_factory=dict)  # a field holding a config -> its flags

    def compile(self, defaults: Any = None) -> tuple[list[inspect.Parameter], Callable[[dict[str, Any]], Any]]:
        """The typer parameters, and how their values (popped from a verb's keyword arguments)
        become the config. The flags default to `defaults` (an instance; None: the class's
        defaults), so `run`'s flags default to RunConfig's stages, not to the stages' own."""
        defaults = self.cls() if defaults is None else defaults
        params, converts = [], {}
        for d in self.cls.described():
            if d.name not in self.nested and (self.only is None or d.name in self.only):
                param, converts[d.name] = _flag(d, getattr(defaults, d.name), self.names.get(d.name))
                params.append(param)
        inner = {name: flags.compile(getattr(defaults, name)) for name, flags in self.nested.items()}
        for nested_params, _ in inner.values():
            params += nested_params

        def build(values: dict[str, Any]) -> Any:
            given = {name: convert(values.pop(name)) for name, convert in converts.items()}
            return replace(defaults, **given, **{name: b(values) for name, (_, b) in inner.items()})

        return params, build


def verb(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` as typer reads a command: each parameter whose default is `Flags` becomes that
    config's flags, and `fn` gets the config built from them."""
    own = inspect.signature(fn, eval_str=True)
    params: list[inspect.Parameter] = []
    builders = {}
    for p in own.parameters.values():
        if isinstance(p.default, Flags):
            generated, builders[p.name] = p.default.compile()
            params += generated
        else:
            params.append(p)
    names = [p.name for p in params] + list(builders)
    if len(set(names)) < len(names):  # e.g. two configs with a field of one name: take it from one only
        raise TypeError(f"verb {fn.__name__}: flags named twice: {sorted({n for n in names if names.count(n) > 1})}")

    def command(**values: Any) -> Any:
        configs = {name: build(values) for name, build in builders.items()}
        return fn(**values, **configs)

    command.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
    command.__name__, command.__doc__ = fn.__name__, fn.__doc__
    return command


# ---- one option -> one flag ---------------------------------------------------------------------------
def _flag(d: Described, default: Any, decl: str | None) -> tuple[inspect.Parameter, Callable[[Any], Any]]:
    """The typer parameter of option `d` defaulting to `default`, and how its value becomes the option's."""
    kind, optional = _unwrap(d.type)
    name = next(n.strip() for n in (decl or f"--{d.name.replace('_', '-')}").split("/") if n.strip())  # for errors
    convert: Callable[[Any], Any] = _same
    if d.path:  # held as a string, read as a path (so normalised as before)
        kind, convert = Path, _text
    elif d.repeat:  # --served-model-name a --served-model-name b
        kind, optional, default, convert = list[str], False, list(default), tuple
    elif get_origin(kind) is dict:  # --label F=C, repeatable
        kind, optional, default, convert = list[str], False, [], lambda pairs: _pairs(pairs, name) or None
    elif get_origin(kind) is tuple:  # --sizes 100,200,400
        kind, convert = str, lambda text, cast=get_args(kind)[0]: _split(text, cast, name)
    elif get_origin(kind) is Literal:  # checked by the config, whose message names the choices
        kind = str
    option = typer.Option(default, *([decl] if decl else []), help=d.help,
                          show_default=not (decl or "").startswith(" /"))  # "--no-x [default: True]" misleads
    annotation = Optional[kind] if optional else kind
    return inspect.Parameter(d.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=option,
                             annotation=annotation), convert


def _unwrap(t: Any) -> tuple[Any, bool]:
    """(the type a flag reads, whether None is allowed): `int | None` -> (int, True); of a union
    of several types (`str | int | None`) the first, as the command line reads text."""
    if get_origin(t) in (Union, types.UnionType):
        args = [a for a in get_args(t) if a is not type(None)]
        return args[0], len(args) < len(get_args(t))
    return t, False


def _same(value: Any) -> Any:
    return value


def _text(value: Any) -> Any:
    return None if value is None else str(value)


def _pairs(pairs: list[str], flag: str) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise typer.BadParameter(f"expected FIELD=COLUMN, got {p!r}", param_hint=flag)
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _split(text: str | None, cast: type, flag: str) -> tuple | None:
    if not text:
        return None
    try:
        return tuple(cast(s.strip()) for s in text.split(",") if s.strip())
    except ValueError:
        what = {int: "whole numbers", float: "numbers"}.get(cast, "values")
        raise UserError(f"{flag} {text!r}: expected comma-separated {what}") from None
