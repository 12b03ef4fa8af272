"""Helpers shared by the TOML readers (`space`, `config`, `stages`): the error type, values
written as TOML, and key checks whose messages name the file, the dotted key and the value.

Pure module: standard library only.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

__all__ = ["SpaceError"]


class SpaceError(ValueError):
    """A search-space file, dict or override is invalid; the message says where and why."""


def fmt(value: object, limit: int = 100) -> str:
    """`value` as it would be written in TOML (shortened to `limit` characters)."""
    text = toml_repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def toml_repr(value: object) -> str:
    """`value` written as a TOML value (`true`, `"text"`, `[1, 2]`, `{a = 1}`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_repr(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {toml_repr(v)}" for k, v in value.items()) + "}"
    isoformat = getattr(value, "isoformat", None)
    if callable(isoformat):  # TOML dates and times
        return str(isoformat())
    return repr(value)


def did_you_mean(key: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def fail(where: str, key: str, value: object, expected: str) -> NoReturn:
    """Raise the one-line error `where: key = value, expected ...`."""
    raise SpaceError(f"{where}: {key} = {fmt(value)}, expected {expected}")


def check_keys(
    where: str,
    section: str,
    table: Mapping[str, Any],
    allowed: Sequence[str],
    required: Mapping[str, str],
    hint: str = "",
) -> None:
    """Reject a key of `table` not in `allowed`, and a missing key of `required`."""
    for key in table:
        if key not in allowed:
            raise SpaceError(
                f"{where}: {section}.{key}: unknown key; expected one of "
                f"{toml_repr(list(allowed))}{did_you_mean(key, allowed)}{hint}"
            )
    for key, expected in required.items():
        if key not in table:
            raise SpaceError(f"{where}: {section}.{key}: missing key; expected {expected}")


def check_unique(where: str, key: str, values: Sequence[object]) -> None:
    first: dict[object, int] = {}
    for i, v in enumerate(values):
        if v in first:
            fail(where, f"{key}[{i}]", v, f"no repeats (it repeats {key}[{first[v]}])")
        first[v] = i


def is_int(value: object) -> bool:
    """An integer that is not a bool (TOML booleans are not numbers)."""
    return isinstance(value, int) and not isinstance(value, bool)
