"""Image folders too large for memory: decoded on the fly in DataLoader worker processes.

An ImageFolder folder or zip is held in memory as uint8 (:mod:`curlprune.data.data`) unless its
decoded size is estimated above a memory budget (or ``streaming: true``): then each split is a
:class:`StreamingDataset`, which holds only the file names and labels and decodes an image when it
is read. Three settings (top level of a run config, flags of the commands that take ``--data``):

* ``streaming``: ``auto`` (default; streamed when the estimate exceeds the budget), ``true``, ``false``;
* ``memory_budget_gb``: the budget (default: half of this machine's memory);
* ``data_workers``: DataLoader worker processes that decode (default: up to 4; 0 = in this process).

The estimate reads the headers of up to :data:`SAMPLED_HEADERS` files spread over the splits
(width x height x 3 bytes each, no decoding) and scales their mean to every file. Which path was
taken, and why, is one line on stderr.

**The same batches.** A streamed split has the in-memory split's images in the same order (class
by class, files sorted), decoded by the same decoder (:func:`curlprune.data.decode.decode_rgb`),
and every reader draws the same indices: the training loop's seeded, per-rank batches
(:func:`curlprune.recover.loop.epoch_batches`), the calibration and BN draws
(:func:`curlprune.data.data.calibration_subset`), the evaluation's contiguous shares. Workers run
only the part of the transform that draws no random number (:func:`curlprune.data.transforms.split_transform`);
the random part runs in the training process, image by image in batch order, from the global torch
RNG, exactly as the in-memory path draws it. So the batches are equal tensors, for any number of
workers, and the training loop's resume (after the last completed epoch) is as exact as in memory.

**Bounded memory.** The dataset object holds two arrays (names, labels; a zip also the offsets of
its members), no pixels; at most ``2 x data_workers`` batches are in flight.

A zip is read per process: each worker opens the file itself (a handle is never shared across a
fork) and reads a member at its offset, stored or deflated (others through :mod:`zipfile`).
"""
from __future__ import annotations

import contextlib
import os
import struct
import sys
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from curlprune.data.data import (
    ImageDataset,
    common_classes,
    load_digits_dataset,
    load_image_folder,
    open_tree,
    parse_layout,
    wanted_splits,
)
from curlprune.data.decode import decode_rgb, image_size, read_file
from curlprune.data.imagetree import zip_files
from curlprune.data.transforms import split_transform
from curlprune.errors import CurlpruneError
from curlprune.models.spec import InputSpec

__all__ = ["DataSettings", "StreamingDataset", "open_splits", "read", "stream", "streams", "workers_of"]

STREAMING = ("auto", "true", "false")
SAMPLED_HEADERS = 32  # files whose headers give the decoded-size estimate
MAX_DEFAULT_WORKERS = 4
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # a zip member's local header: signature ... name length, extra length
_ZIP_ROW = np.dtype([("offset", "<i8"), ("size", "<i8"), ("method", "<i2"), ("crc", "<u4")])


@dataclass(frozen=True)
class DataSettings:
    """How a data folder is read.

    streaming:        "auto" (streamed when the estimated decoded size exceeds the budget), "true", "false".
    memory_budget_gb: the budget in GB (1e9 bytes); None = half of this machine's memory.
    workers:          DataLoader worker processes that decode streamed images; None = min(4, CPUs).
    """

    streaming: str = "auto"
    memory_budget_gb: float | None = None
    workers: int | None = None

    @classmethod
    def of(cls, streaming: Any = None, memory_budget_gb: Any = None, workers: Any = None, where: str = "") -> DataSettings:
        """Checked settings from config or command-line values (None = the default).

        Raises:
            CurlpruneError: ``streaming`` is not auto/true/false, the budget is not a positive number,
                or ``workers`` is not a whole number >= 0.
        """
        prefix = f"{where}: " if where else ""
        mode = ("true" if streaming else "false") if isinstance(streaming, bool) else streaming
        mode = "auto" if mode is None else str(mode).strip().lower()
        if mode not in STREAMING:
            raise CurlpruneError(f"{prefix}streaming must be auto, true or false (got {streaming!r})")
        if memory_budget_gb is not None and (isinstance(memory_budget_gb, bool) or not isinstance(memory_budget_gb, (int, float))
                                             or not 0 < float(memory_budget_gb) < float("inf")):
            raise CurlpruneError(f"{prefix}memory_budget_gb must be a positive number of GB, e.g. 16 (got {memory_budget_gb!r})")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise CurlpruneError(f"{prefix}data_workers must be a whole number >= 0 (got {workers!r})")
        return cls(mode, None if memory_budget_gb is None else float(memory_budget_gb), workers)

    def budget_bytes(self) -> float:
        """The memory budget in bytes (the default: half of the physical memory)."""
        if self.memory_budget_gb is not None:
            return self.memory_budget_gb * 1e9
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2

    def resolved_workers(self) -> int:
        return min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1) if self.workers is None else self.workers


class StreamingDataset(Dataset):
    """The labelled images of one split of an ImageFolder folder or zip, decoded when read:
    ``ds[i] -> (uint8 [3, H, W], int label)``, the same item as the in-memory
    :class:`~curlprune.data.data.ImageDataset` of that split.

    source:  the folder or zip.
    names:   bytes ``[N]``: each image's path inside ``source`` as the user sees it.
    labels:  int64 ``[N]``, indices into ``classes``.
    rows:    for a zip, each member's offset, compressed size, method and CRC; None for a folder.
    workers: DataLoader worker processes that decode for :meth:`batches` and the training loop.
    """

    def __init__(self, source: Path, names: np.ndarray, labels: torch.Tensor, classes: Sequence[str], workers: int,
                 rows: np.ndarray | None = None, members: np.ndarray | None = None) -> None:
        self.source, self.names, self.labels, self.classes = Path(source), names, labels, list(classes)
        self.workers, self.rows, self.members = workers, rows, members
        self._handle: Any = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        where = f"{self.source}:{self.names[index].decode()}"
        data = read_file(self._read, index, where)  # type: ignore[arg-type]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates its decoders on every call
            return decode_rgb(data, where), int(self.labels[index])

    def _read(self, index: int) -> bytes:
        if self.rows is None:
            return (self.source / self.names[index].decode()).read_bytes()
        offset, size, method, crc = (int(v) for v in self.rows[index])
        if method not in (0, 8):  # another compression, or encrypted: zipfile's own reader
            with zipfile.ZipFile(self.source) as archive:
                return archive.read(self.members[index].decode())
        handle = self._file()
        handle.seek(offset)
        header = handle.read(_LOCAL_HEADER.size)
        if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile("no local file header at its offset")
        _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        handle.seek(offset + _LOCAL_HEADER.size + name_length + extra_length)
        raw = handle.read(size)
        try:
            data = raw if method == 0 else zlib.decompress(raw, -15)
        except zlib.error as exc:
            raise zipfile.BadZipFile(f"cannot inflate it: {exc}") from None
        if zlib.crc32(data) != crc:
            raise zipfile.BadZipFile("CRC-32 mismatch")
        return data

    def _file(self) -> Any:
        """This process's own handle on the zip (opened again after a fork: a DataLoader worker)."""
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = open(self.source, "rb"), os.getpid()  # noqa: SIM115  (kept for the process)
        return self._handle

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None, "_pid": None}

    @property
    def uniform(self) -> bool:
        """False: whether all images share one size is not known without decoding them."""
        return False

    def nbytes(self) -> int:
        """Bytes of the arrays this object holds (names, labels, zip rows): no pixels."""
        return sum(int(a.nbytes) for a in (self.names, self.labels.numpy(), self.rows, self.members) if a is not None)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> StreamingDataset:
        """A new streamed dataset of the images at ``indices``, in that order (nothing decoded)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        take = idx.numpy()
        return StreamingDataset(self.source, self.names[take], self.labels[idx], self.classes, self.workers,
                                None if self.rows is None else self.rows[take], None if self.members is None else self.members[take])

    def batches(self, spec: InputSpec, batch_size: int, *, train: bool = False, shuffle: bool = False,
                generator: torch.Generator | None = None, drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """:func:`curlprune.data.data.batches` for this dataset: the same order and, for the eval
        transform, the same tensors; decoded in :attr:`workers` processes. The random part of a
        train transform is applied image by image (as the training loop does)."""
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        stop = len(self) - len(self) % batch_size if drop_last else len(self)
        index_batches = [order[start : start + batch_size].tolist() for start in range(0, stop, batch_size)]
        for images, labels, _ in stream(self, spec, index_batches, train=train, workers=self.workers):
            yield images, labels

    def __repr__(self) -> str:
        return f"StreamingDataset({len(self)} images of {self.source}, {len(self.classes)} classes, {self.workers} workers)"


# ----------------------------------------------------------------------------- reading in workers


@dataclass(frozen=True)
class _Failure:
    """An image a worker could not read: its one-line message travels back instead of a traceback."""

    message: str


class _Prepared(Dataset):
    """``(fixed(image), label, index)`` of a dataset's items, or a :class:`_Failure`."""

    def __init__(self, base: Dataset, fixed: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        self.base, self.fixed = base, fixed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Any:
        try:
            item = self.base[index]
        except CurlpruneError as exc:
            return _Failure(str(exc))
        image = item[0] if self.fixed is None else self.fixed(item[0])
        return image, int(item[1]), int(index)


def _collate(items: list[Any]) -> Any:
    """A batch as one stacked tensor when its images share a shape (cheaper to send), else the list."""
    if any(isinstance(item, _Failure) for item in items) or len({tuple(item[0].shape) for item in items}) != 1:
        return items
    return torch.stack([item[0] for item in items]), [item[1] for item in items], [item[2] for item in items]


def stream(dataset: Dataset, spec: InputSpec, index_batches: list[list[int]], *, train: bool,
           workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The batches ``index_batches`` of ``dataset`` (items ``(uint8 image, label, ...)``), read and
    transformed: ``(float images [B, C, S, S], int64 labels [B], int64 indices [B])``.

    Workers read, decode and apply the fixed part of the transform; the random part
    (:func:`curlprune.data.transforms.split_transform`) runs here, image by image in batch order,
    so the result does not depend on ``workers``. With ``train`` the global RNG gives one draw for
    the DataLoader (as the training loop's in-memory DataLoader does), without it none (as the
    in-memory evaluation).

    Args:
        dataset: a :class:`StreamingDataset`, or a dataset built on one (e.g. the 6x expansion).
        spec: the model's input recipe; train: the train transform (else eval).
        index_batches: the dataset indices of every batch, in order (one DataLoader batch each).
        workers: DataLoader worker processes (0 = read here).
    Raises:
        CurlpruneError: an image cannot be read or decoded (one line naming the file).
    """
    fixed, random = split_transform(spec, train)
    for images, labels, indices in read(dataset, fixed, index_batches, workers, draw_seed=train):
        if random is not None:
            images = torch.stack([random(image) for image in images])
        yield images, labels, indices


def read(dataset: Dataset, fixed: Callable[[torch.Tensor], torch.Tensor] | None, index_batches: list[list[int]], workers: int,
         draw_seed: bool = False) -> Iterator[tuple[torch.Tensor | list[torch.Tensor], torch.Tensor, torch.Tensor]]:
    """The batches ``index_batches`` of ``dataset`` read in ``workers`` processes, with ``fixed``
    (a transform that draws no random number, or None) applied there: ``(images, labels, indices)``,
    the images one tensor when they share a shape, else a list.

    Args:
        draw_seed: let the DataLoader draw its base seed from the global torch RNG (else it has its own
            generator and the global RNG is left as it is).
    Raises:
        CurlpruneError: an image cannot be read or decoded (one line naming the file).
    """
    # The global torch RNG is drawn from as in memory: a DataLoader takes its workers' base seed from
    # it unless given a generator. The training loop's in-memory DataLoader draws it (once per
    # epoch), the in-memory evaluation has no DataLoader and draws nothing.
    own = None if draw_seed else torch.Generator().manual_seed(0)
    loader = DataLoader(_Prepared(dataset, fixed), batch_sampler=index_batches, num_workers=workers, collate_fn=_collate,
                        generator=own)
    for batch in loader:
        if isinstance(batch, tuple):
            images, labels, indices = batch
        else:
            failed = next((item for item in batch if isinstance(item, _Failure)), None)
            if failed is not None:
                raise CurlpruneError(failed.message)
            images, labels, indices = [item[0] for item in batch], [item[1] for item in batch], [item[2] for item in batch]
        yield images, torch.as_tensor(labels, dtype=torch.int64), torch.as_tensor(indices, dtype=torch.int64)


def _streamed_under(dataset: Any) -> StreamingDataset | None:
    """The :class:`StreamingDataset` under ``dataset`` (through ``.base``: the 6x expansion, ``.dataset``:
    a torch ``Subset``), or None."""
    while dataset is not None and not isinstance(dataset, StreamingDataset):
        dataset = getattr(dataset, "base", None) or getattr(dataset, "dataset", None)
    return dataset


def streams(dataset: Any) -> bool:
    """Whether ``dataset`` is streamed: a :class:`StreamingDataset` or a dataset over one."""
    return _streamed_under(dataset) is not None


def workers_of(dataset: Any) -> int:
    """The worker processes of the streamed dataset under ``dataset`` (0 when none is)."""
    found = _streamed_under(dataset)
    return 0 if found is None else found.workers


# ----------------------------------------------------------------------------- choosing the path


def open_splits(source: str | Path, seed: int = 0, splits: Sequence[str] | None = None, settings: DataSettings | None = None,
                say: Callable[[str], None] | None = None) -> dict[str, ImageDataset | StreamingDataset]:
    """The splits of a data source, in memory or streamed (see the module docstring).

    Args:
        source: "digits" (always in memory), or an ImageFolder folder or zip.
        seed: seed of the digits' train/test split.
        splits: only these splits (None = all).
        settings: :class:`DataSettings` (None = the defaults: auto).
        say: where the line naming the path taken goes (default: stderr, on rank 0 under torchrun).
    Returns:
        split name -> :class:`~curlprune.data.data.ImageDataset` or :class:`StreamingDataset`.
    Raises:
        CurlpruneError: as :func:`curlprune.data.data.load_image_folder`; ``streaming: true`` for the digits.
    """
    settings = settings or DataSettings()
    say = say or _say
    if str(source) == "digits":
        if settings.streaming == "true":
            raise CurlpruneError("streaming: true needs an ImageFolder folder or zip; the digits are always held in memory: drop it")
        return load_digits_dataset(seed=seed)
    path = Path(source)
    if settings.streaming == "false":
        say(f"data {path}: decoded into memory (streaming: false)")
        return load_image_folder(path, splits)
    streamed, sample = index_splits(path, splits, settings.resolved_workers())
    images = sum(len(ds) for ds in streamed.values())
    estimate, budget = sample * images, settings.budget_bytes()
    size = f"{images:,} images, about {estimate / 1e9:.3g} GB decoded (from {min(SAMPLED_HEADERS, images)} sampled headers)"
    if settings.streaming == "true" or estimate > budget:
        why = "streaming: true" if settings.streaming == "true" else f"more than the memory budget of {budget / 1e9:.3g} GB"
        say(f"data {path}: {size}; {why}: streamed, decoded on the fly in {settings.resolved_workers()} DataLoader worker(s)")
        return dict(streamed)
    say(f"data {path}: {size}, within the memory budget of {budget / 1e9:.3g} GB: decoded into memory (faster)")
    return load_image_folder(path, splits)


def index_splits(path: Path, splits: Sequence[str] | None, workers: int) -> tuple[dict[str, StreamingDataset], float]:
    """Every wanted split as a :class:`StreamingDataset` (file names and labels only), and the mean
    decoded bytes per image estimated from the headers of up to :data:`SAMPLED_HEADERS` files.

    Raises:
        CurlpruneError: as :func:`curlprune.data.data.load_image_folder` (path, layout, classes, splits).
    """
    with contextlib.ExitStack() as stack:
        files, reader = open_tree(path, stack)
        tree = parse_layout(path, files)
        classes = common_classes(path, tree)
        wanted = wanted_splits(path, tree, splits)
        archive = None if path.is_dir() else stack.enter_context(zipfile.ZipFile(path))
        members = None if archive is None else zip_files(archive, path)
        out = {}
        for split in wanted:
            names = [name for cls in classes for name in tree[split][cls]]  # the in-memory order: class by class
            labels = torch.tensor([label for label, cls in enumerate(classes) for _ in tree[split][cls]], dtype=torch.int64)
            rows = real = None
            if archive is not None and members is not None:
                real = np.array([members[name].encode() for name in names])
                rows = np.array([_zip_row(archive.getinfo(members[name])) for name in names], dtype=_ZIP_ROW)
            out[split] = StreamingDataset(path, np.array([name.encode() for name in names]), labels, classes, workers, rows, real)
        everything = [name for split in wanted for cls in classes for name in tree[split][cls]]
        return out, _mean_decoded_bytes(path, everything, reader)


def _zip_row(info: zipfile.ZipInfo) -> tuple[int, int, int, int]:
    method = -1 if info.flag_bits & 0x1 else info.compress_type  # encrypted: left to zipfile (which refuses it)
    return info.header_offset, info.compress_size, method, info.CRC


def _mean_decoded_bytes(path: Path, names: list[str], reader: Callable[[str], bytes]) -> float:
    """Mean uint8 RGB bytes (3 x width x height) of up to SAMPLED_HEADERS files spread over ``names``."""
    if not names:
        return 0.0
    picked = np.unique(np.linspace(0, len(names) - 1, min(SAMPLED_HEADERS, len(names))).round().astype(int))
    sizes = []
    for i in picked:
        where = f"{path}:{names[i]}"
        data = read_file(reader, names[i], where)
        size = image_size(data)
        if size is None:  # a format without a header we read: decode it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                size = tuple(decode_rgb(data, where).shape[1:])
        sizes.append(3 * size[0] * size[1])
    return float(np.mean(sizes))


def _say(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)
