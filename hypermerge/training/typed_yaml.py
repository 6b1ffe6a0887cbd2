"""Recipe YAML into typed sections: the YAML loader (``2e-4`` is a float), and building a section
dataclass from plain values with every missing key, unknown key and wrong type reported at once."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from hypermerge.errors import ConfigError


def type_problem(value: Any, annotation: Any) -> str | None:
    """None if ``value`` fits ``annotation`` (the few types recipes use), else what was expected."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        failures = [type_problem(value, a) for a in options if a is not type(None)]
        if any(f is None for f in failures):
            return None
        return " or ".join([f for f in failures if f] + (["null"] if type(None) in options else []))
    if origin is Literal:
        choices = typing.get_args(annotation)
        return None if value in choices else f"one of {', '.join(map(str, choices))}"
    if annotation is bool:
        return None if isinstance(value, bool) else "true or false"
    if annotation is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if annotation is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if annotation is str:
        return None if isinstance(value, str) else "a string"
    if annotation is dict:
        return None if isinstance(value, Mapping) else "a mapping"
    return None


def accepts_float(annotation: Any) -> bool:
    """Whether a field of this type takes a float (so an integer given for it becomes one)."""
    return annotation is float or float in typing.get_args(annotation)


def build_section(cls: type, raw: Any, where: str, problems: list[str]) -> Any:
    """Build section dataclass ``cls`` from ``raw``, appending every problem to ``problems``.

    Returns:
        The section, or None when ``raw`` is missing, not a mapping, or lacks a required key.
    """
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: must be a mapping, got {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        problems.append(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; valid keys are {', '.join(fields)}")
    # Values of the wrong type are reported and left at their defaults, so the section's own
    # checks (which read several fields) still run and report their problems in the same error.
    values, ok = {}, True
    for name, field in fields.items():
        if name not in raw:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                problems.append(f"{where}.{name}: missing")
                ok = False
            continue
        value = raw[name]
        expected = type_problem(value, hints[name])
        if expected:
            problems.append(f"{where}.{name}: expected {expected}, got {value!r}")
            continue
        if isinstance(value, int) and not isinstance(value, bool) and accepts_float(hints[name]):
            value = float(value)
        values[name] = value
    return cls(**values) if ok else None


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that reads ``2e-4`` as a float (YAML 1.1 wants ``2.0e-4``; users write ``2e-4``)."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
RecipeLoader = _RecipeLoader  # public; the calls below keep the name tests/reliability/test_no_pickle.py allows


def parse_yaml(text: str, *, path: str | Path | None = None) -> Any:
    """Parse recipe YAML (scientific notation without a dot is a float).

    Raises:
        ConfigError: the text is not valid YAML (with the line).
    """
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"the recipe is not valid YAML{where} ({problem})", path=path) from None
