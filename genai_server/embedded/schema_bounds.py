"""Bounds on a client's JSON schema before the engine's grammar compiler (native code, in this process) sees it.

What a compiler in native code does with a hostile schema cannot be caught with ``try``; so what would hurt is
refused first. Measured on onnxruntime-genai 0.18 (its llguidance), compiling in a process of its own (the figures
behind each bound; ``benchmarks/`` has no script for them: they come from one-off runs described in
docs/reliability.md):

* ``$ref`` chains overflow the compiler's stack: an alias chain of 2500 definitions, or 1000 definitions each an
  object holding the next, killed the process (SIGSEGV); 2000 and 700 compiled. Inline nesting is bounded by the
  request body's depth check (64); through ``$ref`` it is bounded here: the schema's depth with every reference
  expanded (recursion cut where it starts) must stay within ``MAX_DEPTH``.
* Array bounds cost memory linear in the bound (``minItems`` 10^6: +135 MB, 10^9: the OOM killer). No array can
  hold more items than the tokens a sequence may generate, so ``minItems`` above ``max_tokens`` is refused (it can
  never be met) and ``maxItems`` above it is lowered to it (the same answers, in bounded memory).
* Alternatives: past 2000 branches of ``anyOf`` the parser fails while tokens are committed, and 5000 object
  properties took 1.9 s to compile holding the GIL. ``anyOf``/``oneOf``/``enum`` lists and all properties together
  are bounded at 1000 each (OpenAI's own limit for enums), and the schema's size at 200 KB (an ``anyOf`` of 1900
  objects, 167 KB, compiled in 0.3 s).
"""

from __future__ import annotations

import copy
import json
from typing import Any

MAX_DEPTH = 128
MAX_ALTERNATIVES = 1000
MAX_PROPERTIES = 1000
MAX_SCHEMA_BYTES = 200_000
_DEF_KEYS = ("$defs", "definitions")
# Array and object size keywords: the ones whose bound the compiler pays for in memory.
_LOWER_BOUNDS = ("minItems", "minContains", "minProperties")
_UPPER_BOUNDS = ("maxItems", "maxContains", "maxProperties")


class SchemaRefused(ValueError):
    """A schema the engine must not be handed; the message says which bound it passed."""


def bounded_schema(schema: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """``schema`` checked against every bound, with upper size bounds lowered to ``max_tokens`` (a copy)."""
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_BYTES:
        raise SchemaRefused(f"the schema is {size} bytes; at most {MAX_SCHEMA_BYTES} are allowed")
    bounded = copy.deepcopy(schema)
    properties = 0
    for node in _nodes(bounded):
        properties += _check_node(node, max_tokens)
    if properties > MAX_PROPERTIES:
        raise SchemaRefused(f"the schema has {properties} properties; at most {MAX_PROPERTIES} are allowed")
    depth = expanded_depth(bounded)
    if depth > MAX_DEPTH:
        raise SchemaRefused(f"the schema nests {depth} levels deep with its $refs expanded; at most {MAX_DEPTH}")
    return bounded


def _check_node(node: dict[str, Any], max_tokens: int) -> int:
    """Check one schema object (lowering its upper bounds in place); how many properties it declares."""
    for key in ("anyOf", "oneOf", "enum"):
        choices = node.get(key)
        if isinstance(choices, list) and len(choices) > MAX_ALTERNATIVES:
            raise SchemaRefused(f"'{key}' has {len(choices)} entries; at most {MAX_ALTERNATIVES} are allowed")
    for key in _LOWER_BOUNDS:
        bound = node.get(key)
        if isinstance(bound, int | float) and not isinstance(bound, bool) and bound > max_tokens:
            raise SchemaRefused(f"'{key}' is {bound}, more than the {max_tokens} tokens the answer may have")
    for key in _UPPER_BOUNDS:
        bound = node.get(key)
        if isinstance(bound, int | float) and not isinstance(bound, bool) and bound > max_tokens:
            node[key] = max_tokens
    declared = node.get("properties")
    return len(declared) if isinstance(declared, dict) else 0


def _nodes(schema: Any) -> list[dict[str, Any]]:
    """Every object in the document (schemas and what is not, alike), without recursion."""
    found: list[dict[str, Any]] = []
    stack = [schema]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            found.append(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return found


def expanded_depth(schema: dict[str, Any]) -> int:
    """The document's nesting depth with every local ``$ref`` (``#/$defs/x``, ``#/definitions/x``) replaced by what
    it names; a reference back into a definition still being expanded (recursion) counts as a leaf."""
    definitions = {
        f"#/{key}/{name}": value
        for key in _DEF_KEYS
        if isinstance(schema.get(key), dict)
        for name, value in schema[key].items()
    }
    known: dict[str, int] = {}
    pending: list[str] = []  # definitions being expanded, outermost first

    def depth_of(value: Any) -> int:
        # An explicit stack: (value, its depth); a reference adds the depth of what it names.
        deepest = 0
        stack: list[tuple[Any, int]] = [(value, 1)]
        while stack:
            node, level = stack.pop()
            if isinstance(node, dict):
                deepest = max(deepest, level)
                ref = node.get("$ref")
                if isinstance(ref, str) and ref in definitions:
                    deepest = max(deepest, level + reference_depth(ref))
                stack.extend((child, level + 1) for key, child in node.items() if key not in _DEF_KEYS)
            elif isinstance(node, list):
                deepest = max(deepest, level)
                stack.extend((child, level + 1) for child in node)
        return deepest

    def reference_depth(ref: str) -> int:
        if ref in known:
            return known[ref]
        if ref in pending or len(pending) > MAX_DEPTH:  # recursion, or already too deep to matter
            return 0 if ref in pending else MAX_DEPTH + 1
        pending.append(ref)
        try:
            known[ref] = depth_of(definitions[ref])
        finally:
            pending.pop()
        return known[ref]

    return depth_of(schema)
