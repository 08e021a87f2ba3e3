"""The README's Layout section is the package's map: every module and folder of ``src/curlprune`` is
named in it under its own folder, it names nothing that does not exist, and the package root stays
small (issue 17: at most 8 modules at the root)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "curlprune"
MAX_ROOT_MODULES = 8


def layout_block() -> list[str]:
    """The lines of the fenced block under ``## Layout``, from ``src/curlprune/`` to the first line
    that is not indented (``tests/``)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout", 1)[1]
    block = section.split("```", 2)[1].splitlines()
    start = block.index("src/curlprune/")
    lines = []
    for line in block[start + 1:]:
        if line and not line.startswith(" "):
            break
        lines.append(line)
    return lines


def named_in_layout() -> dict[str, set[str]]:
    """Folder ('' for the root) -> the ``*.py`` names and sub-folders its lines name.

    A folder line is ``  name/  ...`` at two spaces; the lines after it (deeper indentation, or the
    folder line itself, which may list its modules inline) belong to it until the next line at two
    spaces."""
    named: dict[str, set[str]] = {"": set()}
    folder = ""
    for line in layout_block():
        indent = len(line) - len(line.lstrip(" "))
        if indent == 2:
            head = line.split()[0]
            if head.endswith("/"):
                folder = head.rstrip("/")
                named[""].add(head)
                named.setdefault(folder, set())
                rest = line[line.index(head) + len(head):]
            else:
                folder = ""
                named[""].add(head)
                continue
        else:
            rest = line
        named[folder].update(re.findall(r"\b([a-z_][a-z0-9_]*\.py)\b(?!:)", rest))
    return named


def in_tree() -> dict[str, set[str]]:
    """Folder ('' for the root) -> its ``*.py`` files (a package's own ``__init__.py`` aside) and, for
    the root, its package folders with a trailing ``/``."""
    tree: dict[str, set[str]] = {"": {p.name for p in SRC.glob("*.py")}}
    for package in sorted(p for p in SRC.iterdir() if (p / "__init__.py").is_file()):
        tree[""].add(package.name + "/")
        tree[package.name] = {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    return tree


def test_every_module_and_folder_is_in_the_layout_under_its_folder():
    named, tree = named_in_layout(), in_tree()
    missing = {folder: sorted(files - named.get(folder, set())) for folder, files in tree.items()}
    assert not {k: v for k, v in missing.items() if v}, f"modules missing from the README Layout: {missing}"


def test_the_layout_names_nothing_that_does_not_exist():
    named, tree = named_in_layout(), in_tree()
    extra = {folder: sorted(files - tree.get(folder, set())) for folder, files in named.items()}
    # names written in passing inside a description (e.g. "model.safetensors") are not module names
    assert not {k: v for k, v in extra.items() if v}, f"README Layout names what the tree lacks: {extra}"


def test_the_package_root_stays_small():
    modules = sorted(p.name for p in SRC.glob("*.py"))
    assert len(modules) <= MAX_ROOT_MODULES, f"{len(modules)} modules at the package root: {modules}"
