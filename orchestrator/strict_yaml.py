"""YAML from untrusted callers (deployment manifests): plain data only, built without recursion.

PyYAML's ``safe_load`` still honours tags (``!!binary`` turns a name into bytes, which pydantic then
turns back into a string that no earlier check saw), anchors and aliases (shared or exponentially
repeated sub-trees) and nests as deep as the text does (its composer recurses: ``[[[[...`` raises
RecursionError). `load_yaml` walks the parser's event stream instead, with the C parser where
libyaml is installed, and builds the document itself with an explicit stack. It refuses, with
the field path and a reason id:

- any tag, explicit (``!!str x``, ``!x``) or on a collection (``yaml.tag``);
- anchors and aliases (``yaml.alias``);
- nesting deeper than ``max_depth`` levels (``yaml.depth``), before the deeper levels are parsed;
- mapping keys that are not text (``? [a]``, ``1:``, ``true:``) and repeated keys (``yaml.key``);
- more than one document (``yaml.documents``) and anything the parser rejects (``yaml.syntax``).

Plain scalars resolve as in YAML 1.1's safe schema to null, bool, int or float; anything else,
and every quoted scalar, is a string. Timestamps stay strings.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml import events

MAX_DEPTH = 32
_Parser: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_RESOLVERS: dict[str, list[tuple[str, re.Pattern[str]]]] = yaml.SafeLoader.yaml_implicit_resolvers
_CONSTRUCT = yaml.constructor.SafeConstructor()
# The plain-scalar types a manifest may hold; these constructors only read the node's text.
_SCALARS = {
    "tag:yaml.org,2002:null": _CONSTRUCT.construct_yaml_null,
    "tag:yaml.org,2002:bool": _CONSTRUCT.construct_yaml_bool,
    "tag:yaml.org,2002:int": _CONSTRUCT.construct_yaml_int,
    "tag:yaml.org,2002:float": _CONSTRUCT.construct_yaml_float,
}


class YamlRefused(ValueError):
    """The document is not plain data; ``path`` is where (``(root)``, ``spec.model.name``)."""

    def __init__(self, path: str, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.path = path
        self.reason = reason
        self.detail = detail


def _plain(value: str) -> Any:
    """A plain scalar as the safe schema reads it (null, bool, int, float), else the text itself."""
    for tag, pattern in [*_RESOLVERS.get(value[:1], []), *_RESOLVERS.get(None, [])]:  # type: ignore[call-overload]
        if pattern.match(value):
            construct = _SCALARS.get(tag)
            return value if construct is None else construct(yaml.ScalarNode(tag, value))
    return value


def _child(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]" if path != "(root)" else f"[{key}]"
    return key if path == "(root)" else f"{path}.{key}"


class _Frame:
    __slots__ = ("key", "path", "value")

    def __init__(self, value: dict[str, Any] | list[Any], path: str) -> None:
        self.value = value
        self.path = path
        self.key: str | None = None  # a mapping's key waiting for its value


def load_yaml(text: str, *, max_depth: int = MAX_DEPTH) -> Any:
    """One YAML (or JSON) document as plain Python data; `YamlRefused` if it is anything else."""
    stack: list[_Frame] = []
    root: Any = None
    documents = 0

    def place(value: Any, event: events.Event) -> str:
        """Attach ``value`` to the open collection (or make it the root); returns its path."""
        nonlocal root
        if not stack:
            root = value
            return "(root)"
        top = stack[-1]
        if isinstance(top.value, list):
            path = _child(top.path, len(top.value))
            top.value.append(value)
            return path
        if top.key is None:  # ``value`` is a key
            if not isinstance(value, str) or not isinstance(event, events.ScalarEvent):
                raise YamlRefused(top.path, "yaml.key", f"mapping keys must be text, not {value!r:.40}")
            if value in top.value:
                raise YamlRefused(_child(top.path, value), "yaml.key", "key given twice")
            top.key = value
            return top.path
        path = _child(top.path, top.key)
        top.value[top.key] = value
        top.key = None
        return path

    def where() -> str:
        if not stack:
            return "(root)"
        top = stack[-1]
        if isinstance(top.value, list):
            return _child(top.path, len(top.value))
        return top.path if top.key is None else _child(top.path, top.key)

    try:
        for event in yaml.parse(text, Loader=_Parser):
            if isinstance(event, events.StreamStartEvent | events.StreamEndEvent | events.DocumentEndEvent):
                continue
            if isinstance(event, events.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise YamlRefused("(root)", "yaml.documents", "one document per manifest")
                continue
            if isinstance(event, events.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise YamlRefused(where(), "yaml.alias", "anchors and aliases are not accepted")
            if isinstance(event, events.CollectionEndEvent):
                frame = stack.pop()
                place(frame.value, event)
                continue
            tag = getattr(event, "tag", None)
            if tag is not None:
                raise YamlRefused(where(), "yaml.tag", f"tags are not accepted ({tag:.40})")
            if isinstance(event, events.ScalarEvent):
                plain = event.implicit[0] and not event.style
                place(_plain(event.value) if plain else event.value, event)
                continue
            if isinstance(event, events.CollectionStartEvent):
                if stack and isinstance(stack[-1].value, dict) and stack[-1].key is None:
                    raise YamlRefused(stack[-1].path, "yaml.key", "mapping keys must be text")
                if len(stack) >= max_depth:
                    raise YamlRefused(where(), "yaml.depth", f"nesting deeper than {max_depth} levels")
                path = where()
                container: dict[str, Any] | list[Any] = (
                    {} if isinstance(event, events.MappingStartEvent) else []
                )
                stack.append(_Frame(container, path))
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if (
            "flow level" in first or "nest" in first
        ):  # libyaml's own limit (1000), reached while scanning ahead
            raise YamlRefused(where(), "yaml.depth", f"nesting deeper than {max_depth} levels") from err
        raise YamlRefused("(root)", "yaml.syntax", f"not valid YAML: {first}") from err
    return root
