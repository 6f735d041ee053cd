"""Dotted-key overrides of a nested config tree, shared by the training and curation command lines."""

from __future__ import annotations

from typing import Any


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """tree[a][b][c] = value for "a.b.c"; a list item by its index ("sources.0.path"); missing sections
    are created. ValueError names the part of the key that is not a section or not a list index."""
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(
                    f"'{'.'.join(parts[: i + 1])}': {part!r} is not an index of the {len(node)}-item list"
                )
            part = int(part)
        elif not isinstance(node, dict):
            raise ValueError(f"'{'.'.join(parts[:i])}' is not a section")
        if i == len(parts) - 1:
            node[part] = value
        else:
            node = node[part] if isinstance(node, list) else node.setdefault(part, {})
