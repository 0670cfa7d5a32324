"""Typed options: the one place each default lives, and how saved options are read back.

Every stage's options are a frozen dataclass deriving from `Options` (ExtractConfig,
TrainConfig, EvalConfig, ServeConfig, CostConfig, CompareConfig, RunConfig). Each field is
declared with `option(default, help=...)`, so its default and what it means are written once: the
CLI generates its flags from these fields (cli/verbs.py), and every folder a stage writes records
the options that made it. A folder written before an option existed reads it as the value older
code behaved with: the class's default, or an explicit `legacy` value where the default changed
since.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, field, fields
from typing import Any, Callable, ClassVar, NamedTuple, get_type_hints


def option(default: Any = MISSING, *, help: str, default_factory: Callable[[], Any] | Any = MISSING,
           path: bool = False, repeat: bool = False) -> Any:
    """A field of an `Options` dataclass with its help: the one place its default and meaning live.
    `default_factory` is for mutable defaults; `path` says the command line reads it as a path
    (normalised as pathlib does) though the options hold a string; `repeat`, that a tuple of
    strings is given by repeating its flag rather than as one comma-separated value."""
    return field(default=default, default_factory=default_factory,
                 metadata={"help": help, "path": path, "repeat": repeat})


class Described(NamedTuple):
    """One option as the command line shows it."""

    name: str
    type: Any  # the annotation, resolved: int, float | None, dict[str, str] | None, ...
    default: Any
    help: str
    path: bool
    repeat: bool = False


class Options:
    """Mixin for frozen option dataclasses: dict round trip, renamed keys, differences."""

    # old key -> new key, for folders written before a rename
    renamed: ClassVar[dict[str, str]] = {}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any], legacy: dict[str, Any] | None = None):
        """The options in `d` (unknown keys ignored, renamed keys followed); a key that is
        missing takes its `legacy` value if given, else the default."""
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        given = {cls.renamed.get(k, k): v for k, v in d.items()}
        return cls(**{k: v for k, v in {**(legacy or {}), **given}.items() if k in known})

    @classmethod
    def described(cls) -> list[Described]:
        """Every option in declaration order, with its resolved type, default and help."""
        hints = get_type_hints(cls)
        return [Described(f.name, hints[f.name], default_of(cls, f.name), f.metadata.get("help", ""),
                          f.metadata.get("path", False), f.metadata.get("repeat", False))
                for f in fields(cls)]  # type: ignore[arg-type]

    def differences(self, saved: dict[str, Any], legacy: dict[str, Any] | None = None,
                    ignore: tuple[str, ...] = ()) -> list[str]:
        """`name=saved value` for each option where the saved options differ from these."""
        old = type(self).from_dict(saved, legacy).to_dict()
        return [f"{k}={old[k]!r}" for k, v in self.to_dict().items() if k not in ignore and old[k] != v]


def default_of(cls: type, name: str) -> Any:
    """The default of option `name` of dataclass `cls`."""
    f = next(f for f in fields(cls) if f.name == name)
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
