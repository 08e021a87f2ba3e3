"""The files of an image tree (a folder or a zip), with directory symlinks followed.

Datasets are often built as symlink farms: class or split folders that are links into a shared
store. Both listings here follow such links, a folder's as the operating system resolves them and
a zip's as ``zip -y`` stores them (an entry with mode ``S_IFLNK`` whose content is the target,
resolved inside the archive), so a linked class is never silently left out. A link that leads back
into a folder that contains it (a cycle), that points nowhere, or (in a zip) that leaves the
archive is one :class:`CurlpruneError` line naming the link.

Hidden entries (``.name``, ``__MACOSX``) are not entered or listed, so a broken link in one does
not matter; a link may still point into a hidden folder (a farm's store).
"""
from __future__ import annotations

import os
import posixpath
import stat
import zipfile
from pathlib import Path

from curlprune.errors import CurlpruneError

MAX_LINK_HOPS = 40  # as the Linux kernel (ELOOP): more links in one path is a cycle

__all__ = ["folder_files", "zip_files"]


def _hidden(name: str) -> bool:
    return name.startswith((".", "__MACOSX"))


def folder_files(root: Path) -> dict[str, Path]:
    """Every visible file under ``root``, directory symlinks followed.

    Args:
        root: an existing folder.
    Returns:
        POSIX path relative to ``root`` (through the links, as the user sees it) -> the file.
    Raises:
        CurlpruneError: a symlink cycle (a link to a folder that contains it), a broken symlink, or
            a folder that cannot be listed; the message names the path.
    """
    files: dict[str, Path] = {}
    _walk_folder(root, root, "", (_identity(root),), files)
    return files


def _identity(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_dev, info.st_ino


def _walk_folder(root: Path, folder: Path, relative: str, ancestors: tuple[tuple[int, int], ...], files: dict[str, Path]) -> None:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise CurlpruneError(f"cannot list {folder} ({exc.strerror or exc}): check its permissions") from None
    for entry in entries:
        if _hidden(entry.name):
            continue
        path, name = Path(entry.path), posixpath.join(relative, entry.name)
        if entry.is_dir(follow_symlinks=True):
            identity = _identity(path)
            if identity in ancestors:
                raise CurlpruneError(
                    f"{root}: {path} is a symlink cycle (it links to {os.readlink(path)}, a folder that contains it): "
                    "remove the link or point it elsewhere"
                )
            _walk_folder(root, path, name, ancestors + (identity,), files)
        elif entry.is_file(follow_symlinks=True):
            files[name] = path
        elif entry.is_symlink():
            raise CurlpruneError(
                f"{root}: {path} is a broken symlink (it links to {os.readlink(path)}, which does not exist): fix or remove the link"
            )


def zip_files(archive: zipfile.ZipFile, where: Path) -> dict[str, str]:
    """Every visible file of a zip, symlink entries followed inside the archive.

    Args:
        archive: the open zip.
        where: the zip's path (named in errors).
    Returns:
        POSIX path as the user sees it (through the links) -> the name of the member holding its bytes.
    Raises:
        CurlpruneError: a symlink cycle, a broken symlink or one that leads outside the archive,
            naming the link.
    """
    tree = _ZipTree(archive, where)
    files: dict[str, str] = {}
    tree.walk("", "", frozenset({""}), files)
    return files


class _ZipTree:
    """The members of a zip as a tree of folders, files and links."""

    def __init__(self, archive: zipfile.ZipFile, where: Path) -> None:
        self.where = where
        self.files: set[str] = set()
        self.links: dict[str, str] = {}
        self.children: dict[str, set[str]] = {"": set()}
        for info in archive.infolist():
            name = info.filename.strip("/")
            if not name:
                continue
            if info.is_dir():
                self._add(name, folder=True)
            elif stat.S_ISLNK(info.external_attr >> 16):
                self.links[name] = archive.read(info).decode("utf-8", "replace")
                self._add(name, folder=False)
            else:
                self.files.add(name)
                self._add(name, folder=False)

    def _add(self, name: str, folder: bool) -> None:
        parent, _, _ = name.rpartition("/")
        if folder:
            self.children.setdefault(name, set())
        while True:
            self.children.setdefault(parent, set()).add(name)
            if not parent:
                return
            name, (parent, _, _) = parent, parent.rpartition("/")

    def walk(self, folder: str, shown: str, ancestors: frozenset[str], files: dict[str, str]) -> None:
        for name in sorted(self.children.get(folder, ())):
            base = name.rpartition("/")[2]
            if _hidden(base):
                continue
            path = posixpath.join(shown, base)
            real = self._follow(name, path)
            if real in self.files:
                files[path] = real
            elif real in self.children:
                if real in ancestors:
                    raise CurlpruneError(f"{self.where}: {path} is a symlink cycle (it links to {real or 'the top'}, "
                                         "a folder that contains it): remove the link or point it elsewhere")
                self.walk(real, path, ancestors | {real}, files)
            else:
                raise CurlpruneError(f"{self.where}: {path} is a broken symlink (it links to {self.links.get(name)}, "
                                     "which is not in the archive): fix or remove the link")

    def _follow(self, name: str, shown: str, hops: list[int] | None = None) -> str:
        """``name`` with every link in it followed, component by component (``shown`` names it in errors)."""
        hops = [0] if hops is None else hops
        real = ""
        for part in name.split("/"):
            real = f"{real}/{part}" if real else part
            if real not in self.links:
                continue
            hops[0] += 1
            if hops[0] > MAX_LINK_HOPS:
                raise CurlpruneError(f"{self.where}: {shown} is a symlink cycle (more than {MAX_LINK_HOPS} links in a row): "
                                     "remove the link or point it elsewhere")
            target = self.links[real]
            joined = posixpath.normpath(posixpath.join(posixpath.dirname(real), target))
            if target.startswith("/") or joined == ".." or joined.startswith("../"):
                raise CurlpruneError(f"{self.where}: {shown} is a symlink to {target}, outside the archive: "
                                     "store the file itself (zip without -y) or point the link inside the archive")
            real = "" if joined == "." else self._follow(joined, shown, hops)
        return real
