"""Per-image records for rows of the ResNet-56 benchmark (issue 21) finished before the records
existed: ``python benchmarks/cifar_resnet56.py --backfill-images [--rows PATTERN]``.

For every finished row of the rows file without a record in its sidecar (bench_images), the
row's final model is rebuilt from what the benchmark kept, evaluated once on val and test, and its
record appended, only when the recomputed top-1s are the row's stored ones (to 0.01 points;
otherwise one line says which row differs and by how much, and nothing is written):

* a trained row: the cached pruned model of its family (``resolved_to`` for TP best; bench
  ``Bench.load_cached``) with the distill stage's final weights,
  ``<out>/t<target>/<family>/distill-e<E>-s<S>[-<amp>]/distill/model.safetensors`` (the last
  epoch, which the row reports; ``best.safetensors`` is only the divergence guard's copy of the
  best epoch, curlprune.recover.divergence); the folder is named after the row's own family
  (``tp-best`` for TP best's seeds 1 and 2), as ``Bench.recover`` names it;
* an allocation-study row (no training): the cached pruned model with its BN statistics
  re-estimated (``Bench.bn_reestimated``: a fixed draw of training images, deterministic).

Nothing under ``out`` is written (no cache lock is taken: the cache files are written once and
read here). Resumable: a row with a record is skipped. The sidecar is appended under its lock
(bench_stats.RowsFile), so it runs alongside benchmark processes sharing the same files.
``same_as`` rows need no record (bench_images.record_for resolves them), nor does ``timing``.
A row computed on another device than the bench's is left for a backfill on that device.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from pathlib import Path

from bench_alias import pruned_digest
from bench_images import mismatch
from bench_stats import RowsFile
from curlprune.errors import CurlpruneError
from curlprune.recover.stage import load_stage_model


def distill_folder(out: Path, target: float, family: str, epochs: int, seed: int, amp: str | None) -> Path:
    """The run folder of a row's distill stage: ``<out>/t<target>/<family>/distill-e<E>-s<S>[-<amp>]``
    (``amp`` None or "off": no suffix; a stage resumes only with its own amp, docs/method.md §11)."""
    tag = f"-{amp}" if amp and amp != "off" else ""
    return Path(out) / f"t{target:g}" / family / f"distill-e{epochs}-s{seed}{tag}"


def final_model(bench, row: Mapping):
    """The final model of the finished ``row``, rebuilt as the module docstring says.

    Args:
        bench: a ``cifar_resnet56.Bench`` (its ``out``, ``cache_paths``, ``load_cached``,
            ``bn_reestimated``).
        row: a finished, non-alias row of the rows file.
    Returns:
        The model (eval mode).
    Raises:
        CurlpruneError: the cached pruned model or the distill stage's weights are missing, or the
            cached model is not the row's (its ``pruned_sha256``, when recorded).
    """
    family = row.get("resolved_to") or row["family"]
    _, path, info = bench.cache_paths(family, row["target"])
    if not (path.is_file() and info.is_file()):
        raise CurlpruneError(f"no cached pruned model {path}: point --out at the run folders of this rows file")
    model = bench.load_cached(family, path)
    if row.get("pruned_sha256") and pruned_digest(model) != row["pruned_sha256"]:
        raise CurlpruneError(f"the cached pruned model {path} is not the one the row was computed with (sha256 differs)")
    if not row["epochs"]:
        return bench.bn_reestimated(model)
    folder = distill_folder(bench.out, row["target"], row["family"], row["epochs"], row["seed"], row.get("amp"))
    return load_stage_model(model, folder, "distill").eval()


def selected(row_id: str, pattern: str | None) -> bool:
    """Whether ``row_id`` matches one of the comma-separated globs of ``--rows`` (None: all)."""
    return not pattern or any(fnmatch.fnmatchcase(row_id, p) for p in pattern.split(","))


def backfill(bench, rows: Mapping[str, dict], images: RowsFile, pattern: str | None = None,
             log: Callable[[str], None] = print) -> dict[str, list[str]]:
    """Write the missing per-image records of the finished ``rows`` (one thread, in file order).

    Args:
        bench: a ``cifar_resnet56.Bench`` (see :func:`final_model`; ``record(model, row_id)``
            gives the row's per-image record, ``device`` where it evaluates).
        rows: id -> finished row (the rows file's ``read()``).
        images: the sidecar (bench_images.sidecar_path of the rows file).
        pattern: ``--rows`` globs; None: every row.
        log: one line per row handled.
    Returns:
        ``{"written", "refused", "skipped"}``: the row ids of each outcome (rows with a record,
        aliases and the timing row are not listed). ``refused``: a recomputed top-1 that is not
        the stored one; ``skipped``: another device, or no cached model or weights to rebuild it.
    """
    outcome: dict[str, list[str]] = {"written": [], "refused": [], "skipped": []}
    have = images.read()
    for row in rows.values():
        if row.get("kind") in (None, "timing") or row.get("same_as") or row["id"] in have or not selected(row["id"], pattern):
            continue
        device = row.get("device") or "cpu"
        if device != bench.device.type:
            log(f"{row['id']}: computed on {device}, this backfill runs on {bench.device.type}: run it with --device {device}")
            outcome["skipped"].append(row["id"])
            continue
        try:
            model = final_model(bench, row)
        except CurlpruneError as exc:
            log(f"{row['id']}: {exc}")
            outcome["skipped"].append(row["id"])
            continue
        record = bench.record(model, row["id"])
        problem = mismatch(row, record)
        if problem:
            log(problem)
            outcome["refused"].append(row["id"])
            continue
        images.append(record)
        outcome["written"].append(row["id"])
        log(f"{row['id']}: record written (val {record['val_top1']:.2f}, test {record['test_top1']:.2f}, as stored)")
    return outcome
