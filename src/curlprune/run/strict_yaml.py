"""YAML read as a config must be read: a key given twice is an error, not "the last one wins".

PyYAML's ``safe_load`` keeps the last of two equal keys without a word, so ``seed: 0`` ... ``seed: 1``
or two ``prune:`` sections silently run something other than what the reader of the file sees.
:func:`safe_load` is ``yaml.safe_load`` with every mapping's keys checked, at every nesting level
and in flow mappings (``{a: 1, a: 2}``) too. Keys merged in with ``<<: *anchor`` may be overridden,
as YAML intends.
"""
from __future__ import annotations

from typing import Any

import yaml

__all__ = ["DuplicateKeyError", "UniqueKeyLoader", "safe_load"]

_MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.YAMLError):
    """A mapping holds the same key twice; ``str()`` is one line naming the key and both lines."""

    def __init__(self, key: Any, first_line: int, second_line: int) -> None:
        self.key, self.first_line, self.second_line = key, first_line, second_line
        super().__init__(f"the key {key!r} is given twice (line {first_line} and line {second_line}): keep one of them")


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that raises :class:`DuplicateKeyError` for a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base loader reports it
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise DuplicateKeyError(key, first, line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def safe_load(text: str) -> Any:
    """``yaml.safe_load(text)`` refusing duplicate keys.

    Raises:
        DuplicateKeyError: a mapping holds a key twice (a ``yaml.YAMLError``).
        yaml.YAMLError: the text is not YAML.
    """
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
