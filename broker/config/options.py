"""The setting declaration machinery: `setting(...)` declares a `Settings` field with its
environment variable, parser and help; `Option` is that declaration as the environment and the
command line see it, and `declared_options` derives them all from a dataclass's fields.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

__all__ = ["Option", "declared_options", "parse_raw", "setting", "unknown_variables"]


@dataclass(frozen=True, slots=True)
class Option:
    """One setting as the environment and the command line see it, derived from its
    `Settings` field (`OPTIONS`): the field's name and default, and what `setting` declared."""

    field: str
    env: str
    parse: Callable[[str], Any]
    help: str
    value: Any  # the field's default
    secret: bool = False  # never echo the value in an error message
    redact: Callable[[str], str] | None = None  # what of the value an error message may show
    default: str | None = None  # the default, in words, when the field's value does not say it
    fallback_env: str | None = None  # read when `env` is unset or empty

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    def default_text(self) -> str:
        """The default as help shows it: `default`, else the field's value."""
        if self.default is not None:
            return self.default
        if self.value is None or self.value == ():
            return "unset"
        if isinstance(self.value, bool):
            return str(self.value).lower()
        if isinstance(self.value, float):
            return f"{self.value:g}"
        return str(self.value)

    def shown(self, value: str) -> str:
        """`value` as an error message may quote it."""
        if self.secret:
            return "<hidden>"
        return repr(value if self.redact is None else self.redact(value))

    def read(self, environ: Mapping[str, str]) -> str:
        """The raw value in `environ`; empty counts as unset."""
        value = environ.get(self.env, "")
        if not value and self.fallback_env is not None:
            value = environ.get(self.fallback_env, "")
        return value


def setting(
    default: Any,
    env: str,
    parse: Callable[[str], Any],
    help: str,
    *,
    secret: bool = False,
    redact: Callable[[str], str] | None = None,
    shown_default: str | None = None,
    fallback_env: str | None = None,
) -> Any:
    """A `Settings` field declared with everything else about it: its environment variable,
    parser and help (the flag is its name). Secret values stay out of `repr`."""
    declared = {
        "env": env,
        "parse": parse,
        "help": help,
        "secret": secret,
        "redact": redact,
        "default": shown_default,
        "fallback_env": fallback_env,
    }
    return dataclasses.field(default=default, repr=not secret, metadata={_OPTION: declared})


_OPTION = "broker.option"


def declared_options(cls: type) -> tuple[Option, ...]:
    """One `Option` per field of the dataclass `cls`, each declared with `setting`."""
    return tuple(
        Option(field=field.name, value=field.default, **field.metadata[_OPTION])
        for field in dataclasses.fields(cls)
    )


def parse_raw(options: tuple[Option, ...], raw: Mapping[str, str]) -> dict[str, Any]:
    """The values of `raw` (raw text by field name), parsed; raises `ConfigError` naming the
    first invalid setting."""
    values: dict[str, Any] = {}
    for option in options:
        if option.field not in raw:
            continue
        try:
            values[option.field] = option.parse(raw[option.field])
        except ValueError as exc:
            shown = option.shown(raw[option.field])
            raise ConfigError(f"invalid {option.env}={shown}: {_reason(exc)}") from None
    return values


def _reason(exc: ValueError) -> str:
    text = str(exc)
    if text.startswith(("invalid literal", "could not convert")):
        return "not a number"
    return text


def unknown_variables(
    options: tuple[Option, ...], environ: Mapping[str, str], prefix: str = "BROKER_"
) -> list[tuple[str, str | None]]:
    """Each variable of `environ` named `prefix*` that no option reads, with the closest name
    an option does read (None if none is close): a misspelt setting would otherwise be
    ignored without a word. The names known are those `options` declare, so a new setting
    is known as soon as it is declared."""
    known = sorted(
        name
        for option in options
        for name in (option.env, option.fallback_env)
        if name is not None and name.startswith(prefix)
    )

    def closest(name: str) -> str | None:
        # Compared without the prefix, which every name shares and would make all alike.
        rests = [known_name.removeprefix(prefix) for known_name in known]
        found = difflib.get_close_matches(name.removeprefix(prefix), rests, n=1, cutoff=0.6)
        return prefix + found[0] if found else None

    return [
        (name, closest(name))
        for name in sorted(environ)
        if name.startswith(prefix) and name not in known
    ]
