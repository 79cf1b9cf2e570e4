"""A ready-to-commit params.yaml change: new values for dotted keys, as a unified diff `git apply` takes.

Only the lines of the changed keys differ; comments, key order and layout stay
as they are. Written by hand because a YAML round trip (ruamel.yaml) re-indents
and re-wraps the file; the diff itself is difflib's.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

# `  key: value  # comment`: indentation, key, the value and the spacing and comment after it.
_ENTRY = re.compile(
    r"^(?P<indent> *)(?P<key>[A-Za-z_][\w-]*):(?P<gap> *)(?P<value>[^#\n]*?)(?P<tail> *(#.*)?)$"
)
SIGNIFICANT_DIGITS = 4  # a searched float is written with this many; finer differences are noise


@dataclass(frozen=True)
class ParamsPatch:
    """The diff, and the keys it could not place (no `key: value` line for them in the file)."""

    diff: str
    missing: tuple[str, ...]


def yaml_scalar(value: object) -> str:
    """A value as params.yaml spells it: plain decimals (0.00001; YAML 1.1 reads 1e-05 as a string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return np.format_float_positional(float(value), precision=SIGNIFICANT_DIGITS, unique=False,
                                          fractional=False, trim="0")  # fmt: skip
    return str(value)


def _replace_value(line: str, match: re.Match[str], text: str) -> str:
    """The line with its value replaced; a trailing comment keeps its column where the value fits."""
    start, end = match.span("value")
    tail = match.group("tail")
    comment = tail.lstrip(" ")
    if not comment:
        return line[:start] + text + line[end:]
    column = start + len(match.group("value")) + len(tail) - len(comment)
    spaces = max(column - start - len(text), 1)
    return line[:start] + text + " " * spaces + comment + line[match.end() :]


def with_values(text: str, values: Mapping[str, object]) -> tuple[str, tuple[str, ...]]:
    """params.yaml text with the dotted keys' scalar values replaced in place.

    Args:
        text: the file's content.
        values: new values by dotted key, e.g. {"train.augment.zoom": 0.1}.

    Returns:
        The new text, and the keys that have no `key: value` line in it.
    """
    lines = text.splitlines(keepends=True)
    path: list[tuple[int, str]] = []  # (indent, key) of the mappings the current line is inside
    found: set[str] = set()
    for number, line in enumerate(lines):
        match = _ENTRY.match(line.rstrip("\n"))
        if match is None:
            continue
        indent = len(match.group("indent"))
        while path and path[-1][0] >= indent:
            path.pop()
        dotted = ".".join([*(key for _, key in path), match.group("key")])
        if not match.group("value"):  # `section:` opens a nested mapping
            path.append((indent, match.group("key")))
            continue
        if dotted in values:
            ending = line[len(line.rstrip("\n")) :]
            lines[number] = _replace_value(line.rstrip("\n"), match, yaml_scalar(values[dotted])) + ending
            found.add(dotted)
    return "".join(lines), tuple(key for key in values if key not in found)


def params_patch(text: str, values: Mapping[str, object], name: str = "params.yaml") -> ParamsPatch:
    """A unified diff (`a/<name>`, `b/<name>`) setting `values` in a params file; empty if nothing changes.

    Args:
        text: the params file's content.
        values: new values by dotted key.
        name: the file's path relative to the repository root, as `git apply` resolves it.
    """
    changed, missing = with_values(text, values)
    diff = list(
        difflib.unified_diff(
            text.splitlines(keepends=True),
            changed.splitlines(keepends=True),
            fromfile=f"a/{name}",
            tofile=f"b/{name}",
        )
    )
    # git's marker for a last line without a newline (difflib leaves it out).
    diff = [line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in diff]
    return ParamsPatch("".join(diff), missing)
