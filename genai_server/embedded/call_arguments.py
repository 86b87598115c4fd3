"""A tool call's arguments checked against its function's schema before the call is returned as one.

A call the engine wrote inside the tool grammar already follows its schema. With ``tool_choice: "auto"`` a call the
model writes after some text is outside the grammar (the grammar allows text *or* calls), so its arguments can be
anything: those are checked here, and a call whose arguments do not fit is the model's text, not a call.

Both inputs are untrusted: the schema is the client's, and the arguments are the model's text, which the client's
prompt steers. So the check is bounded: every regular expression runs in RE2 (linear time; Python's ``re``
backtracks, and a ``pattern`` such as ``(a|aa)+$`` on 40 characters would hold the event loop for seconds), and a
check whose cost could be large (schema size times arguments size past a budget) is not made: such a call is not
vouched for, so it is not returned as a call either. ``unevaluatedProperties`` is not checked (it needs Python's
``re`` for ``patternProperties``).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from typing import Any

import re2  # type: ignore[import-untyped]
from jsonschema import Draft202012Validator, ValidationError, validators

log = logging.getLogger(__name__)

# Schema characters times argument characters (2 KB of schema and 1 KB of arguments fit). The costliest check found at
# this size (an array of objects, each matched against an anyOf of 20 to 1000 branches) took 17-28 ms; at ten
# times the budget, 0.17-0.28 s of the event loop.
CHECK_BUDGET = 2_000_000


@functools.lru_cache(maxsize=512)
def _regex(pattern: str) -> Any:
    """``pattern`` compiled by RE2, or None if RE2 cannot (lookarounds, backreferences: the grammar compiler
    refuses those too, so a call never follows such a schema)."""
    try:
        return re2.compile(pattern)
    except re2.error:
        return None


def _matches(pattern: str, text: str) -> bool:
    regex = _regex(pattern)
    return regex is not None and regex.search(text) is not None


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _matches(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(validator: Any, patterns: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _matches(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator: Any, allowed: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    known, patterns = schema.get("properties", {}), schema.get("patternProperties", {})
    extras = [k for k in instance if k not in known and not any(_matches(p, k) for p in patterns)]
    if validator.is_type(allowed, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], allowed, path=extra)
    elif not allowed and extras:
        yield ValidationError(f"additional properties are not allowed: {', '.join(map(repr, sorted(extras)))}")


def _unchecked(validator: Any, value: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    return iter(())


_Validator = validators.extend(
    Draft202012Validator,
    {
        "pattern": _pattern,
        "patternProperties": _pattern_properties,
        "additionalProperties": _additional_properties,
        "unevaluatedProperties": _unchecked,
    },
)


class ArgumentCheck:
    """Whether a call's arguments fit one function's ``parameters`` (None: it takes none, any object fits)."""

    def __init__(self, schema: dict[str, Any] | None) -> None:
        self._schema = schema
        self._size = len(json.dumps(schema)) if schema is not None else 0

    def __call__(self, arguments: Any) -> bool:
        if self._schema is None:
            return isinstance(arguments, dict)
        if self._size * len(json.dumps(arguments)) > CHECK_BUDGET:
            log.info("a tool call's arguments were too large to check against its schema: not returned as a call")
            return False
        try:
            return bool(_Validator(self._schema).is_valid(arguments))
        except (RecursionError, ValueError, LookupError, TypeError):  # an unresolvable $ref, a schema it cannot use
            log.info("a tool call's arguments could not be checked against its schema", exc_info=True)
            return False
