"""Write an ensemble's member weights into a models.yaml in place, keeping the rest of the
file byte for byte (comments, order, quoting, blank lines, line endings).

PyYAML's composer gives every node the character offsets where it starts and ends in the
text; the weight scalars are replaced there, and a member without a ``weight:`` key gets one
after its ``path`` (in a block mapping, a line of its own at the keys' indentation; in a flow
mapping ``{...}``, ``, weight: X`` after the last value). No round-trip YAML library is
needed. The result is checked: read back, it must equal the original with only those
weights changed.

Refused (a ConfigError that says to set the weights by hand, and gives them): anchors and
aliases anywhere in the file (an edit could change another place that shares the node), a
weight that is not a plain number, a member or ensemble given twice, and anything whose
layout is not one of the above.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ..errors import ConfigError


def format_weight(w: float) -> str:
    """A weight as written: 4 decimals, trailing zeros dropped (``0.6123``, ``0.5``, ``1.0``).
    Always with a dot, which YAML 1.1 (PyYAML) needs to read it as a number."""
    text = f"{round(float(w), 4):.4f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def set_weights(text: str, ensemble: str, weights: Mapping[str, float], *, file: str = "") -> str:
    """``text`` (a models.yaml) with the members of ``ensemble`` weighted ``weights`` (by member
    name; each written with :func:`format_weight`). Members not in ``weights`` keep theirs."""
    manual = "; set them by hand instead: " + ", ".join(f"{k}: {format_weight(v)}" for k, v in weights.items())

    def refuse(reason: str, key: str | None = None) -> ConfigError:
        return ConfigError(f"cannot update the weights in place: {reason}{manual}", file=file or None, key=key)

    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise refuse("the file uses YAML anchors or aliases (&name, *name, <<), and an edit "
                             "could change every place that shares a node")
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is None:
            raise refuse("the file is empty")
    except yaml.YAMLError as exc:
        raise refuse(f"the file is not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    ens_key = f"ensembles.{ensemble}"
    ensembles = _get(root, "ensembles", refuse, "ensembles")
    ens = _get(ensembles, ensemble, refuse, ens_key)
    members = _get(ens, "members", refuse, f"{ens_key}.members")
    if not isinstance(members, SequenceNode):
        raise refuse("`members` is not a list", f"{ens_key}.members")
    newline = "\r\n" if "\r\n" in text else "\n"
    edits: list[tuple[int, int, str]] = []
    seen: set[str] = set()
    for i, item in enumerate(members.value):
        mkey = f"{ens_key}.members[{i}]"
        if not isinstance(item, MappingNode):
            raise refuse("a member is not a mapping", mkey)
        name_node = _get(item, "name", refuse, mkey)
        if not isinstance(name_node, ScalarNode):
            raise refuse("a member's name is not a string", f"{mkey}.name")
        name = name_node.value
        if name in seen:
            raise refuse(f"member {name!r} is listed twice", mkey)
        seen.add(name)
        if name not in weights:
            continue
        value = format_weight(weights[name])
        pairs = [(k, v) for k, v in item.value if isinstance(k, ScalarNode) and k.value == "weight"]
        if len(pairs) > 1:
            raise refuse(f"member {name!r} has `weight` twice", mkey)
        if pairs:
            node = pairs[0][1]
            if not isinstance(node, ScalarNode) or node.style is not None or node.tag not in (
                    "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
                raise refuse(f"member {name!r}'s weight is not a plain number", f"{mkey}.weight")
            edits.append((node.start_mark.index, node.end_mark.index, value))
        else:
            edits.append(_insertion(text, item, value, newline, refuse, mkey))
    missing = [n for n in weights if n not in seen]
    if missing:
        raise refuse(f"ensemble {ensemble!r} has no member {missing[0]!r} in the file", f"{ens_key}.members")
    out = text
    for start, end, new in sorted(edits, reverse=True):
        out = out[:start] + new + out[end:]
    _check(text, out, ensemble, weights, refuse)
    return out


def _get(parent: Node, key: str, refuse: Any, where: str) -> Node:
    """The value of ``key`` in a mapping node (refused when absent, twice, or not a mapping)."""
    if not isinstance(parent, MappingNode):
        raise refuse("it is not a mapping", where.rpartition(".")[0] or None)
    found = [v for k, v in parent.value if isinstance(k, ScalarNode) and k.value == key]
    if not found:
        raise refuse(f"`{key}` is not in the file", where)
    if len(found) > 1:
        raise refuse(f"`{key}` is given twice", where)
    node: Node = found[0]
    return node


def _insertion(text: str, item: MappingNode, value: str, newline: str, refuse: Any, mkey: str
               ) -> tuple[int, int, str]:
    """Where and what to insert for a member mapping without ``weight``."""
    if item.flow_style:  # {name: a, path: b} -> {name: a, path: b, weight: X}
        last = item.value[-1][1]
        at = last.end_mark.index
        return at, at, f", weight: {value}"
    pairs = {k.value: (k, v) for k, v in item.value if isinstance(k, ScalarNode)}
    for anchor in ("path", "name"):
        if anchor not in pairs:
            continue
        k, v = pairs[anchor]
        if not isinstance(v, ScalarNode) or v.style not in (None, "'", '"') or \
                v.start_mark.line != k.start_mark.line or v.end_mark.line != k.start_mark.line:
            continue  # a multi-line or block value: try the other key
        eol = text.find("\n", v.end_mark.index)
        line = " " * k.start_mark.column + f"weight: {value}" + newline
        if eol < 0:  # the last line, without a newline
            return len(text), len(text), newline + line.removesuffix(newline)
        return eol + 1, eol + 1, line
    raise refuse("the member's `path` and `name` are not on single lines, so where a `weight:` line "
                 "goes is not clear", mkey)


def _check(before: str, after: str, ensemble: str, weights: Mapping[str, float], refuse: Any) -> None:
    """Read back, the edited file must equal the original with only those weights changed."""
    try:
        old = yaml.safe_load(before)
        new = yaml.safe_load(after)
    except yaml.YAMLError:
        raise refuse("the edited file would not be valid YAML") from None
    expected = copy.deepcopy(old)
    for m in expected["ensembles"][ensemble]["members"]:
        if m.get("name") in weights:
            m["weight"] = float(format_weight(weights[m["name"]]))
    if new != expected:
        raise refuse("the edited file would not read back as the original with new weights")
