"""Side-by-side benchmark at equal MACs: curlprune vs Torch-Pruning 1.6.1, CIFAR-10 ResNet-56
(issue 9; made referee-proof in issue 21).

Data: ../shared/data/cifar10-png.zip (lossless CIFAR-10). Model and teacher: the published
ResNet-56 (../shared/models/resnet56-4bfd9763.th). Targets: 50% and 30% of the unpruned MACs.

* Validation split: 5,000 training images (500 per class, seeded: curlprune.data.valsplit.hold_out)
  are held out; calibration, BN re-estimation and recovery use only the other 45,000. Every choice
  (the allocation study, which Torch-Pruning variant is "TP best") is made on validation top-1;
  the 10,000 test images only report. Per-epoch monitoring uses 1,000 validation images.
* Every row: prune -> top-1 raw and after BN re-estimation (2,048 training images) on val and test
  -> curlprune's distill stage (mixup KD from the teacher, batch 64, lr 0.02, warm-up 0.2 epoch,
  cosine) for E epochs from the BN-re-estimated model with the row's seed (data order, mixup) ->
  top-1 of the last epoch on val and test.
* Torch-Pruning: 12 variants per target (bench_plan.py), each stopped at the step nearest the
  target (a finer schedule when outside 1%; a row outside 1% is flagged in the report).
* Resumable: one JSON line per finished row in --rows-file, keyed by the row id; a finished row
  is never recomputed (bench_stats.run_pending); one whose pruned model is bit-identical to a finished
  row's is recorded `same_as` it, untrained (bench_alias.py). Pruned models are cached under
  --out/t<target>/<family>/, scores under --out/scores/. Processes sharing the rows file split the
  plan dynamically: each claims the next free row that can run (bench_stats.RowsFile.claim; a killed
  process's claim is taken over); --shard i/n instead pins every n-th row to one process.
* Device: --device cpu (default, one thread: the recorded rows' setting) | cuda[:i] | auto, and
  --amp off (default) | bf16. The device takes the prune stage's part (scoring the unpruned model,
  BN re-estimation, evaluation, docs/method.md §10; Torch-Pruning's stepped pruning, selection and
  slicing stay on the CPU) and the distill stage (device, amp: docs/method.md §11) of every row,
  Torch-Pruning's included; on a GPU evaluation runs in batches of 1,024, the training batches
  come from 4 DataLoader workers (--workers) and cuDNN picks its fastest kernels. Every row
  records `device` and `amp` (rows without them ran on the CPU in float32); they are not part of
  the row id: a finished row is not recomputed on another device, and the report flags means and
  differences over rows from more than one device. --extra-long-epochs 100 adds the literature's
  100-epoch recovery of kl-best and TP best at 50% (seed 0) after every other row (GPU only, in
  practice; the default plan has none).
* Timing rows (bench_timing.py), side by side in one process, one thread: ``timing`` (exact kl vs
  kl-approx scoring) and ``timing-prune@0.5/e0/s0`` (each method's time from the unpruned model to
  its pruned model at 50%, computed afresh: no cache read or written). The other rows' CPU seconds
  are not comparable across rows (measured under different load).
* Per-image records (bench_images.py): the final model's correctness on every val and test image
  of each row, appended to the sidecar <rows-file>_images.jsonl when it is evaluated; the report's
  image and combined standard errors use them. --backfill-images writes them for rows finished
  before (bench_backfill.py: rebuilt from --out, checked against the stored top-1).

    python benchmarks/cifar_resnet56.py --list            # planned rows, estimated cost
    python benchmarks/cifar_resnet56.py                   # one of two background processes (start it twice)
    python benchmarks/cifar_resnet56.py --report          # rewrite the markdown from the rows file
    python benchmarks/cifar_resnet56.py --smoke           # a few minutes, end to end, runs/bench-r56-smoke
    python benchmarks/cifar_resnet56.py --device cuda --amp bf16 --extra-long-epochs 100 --rows '*/e100/*'
    python benchmarks/cifar_resnet56.py --backfill-images  # per-image records of the rows finished without them
"""
from __future__ import annotations

import argparse
import copy
import fcntl
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_plan as bp  # noqa: E402
from bench_alias import alias_record, find_same, pruned_digest  # noqa: E402
from bench_backfill import backfill, distill_folder, selected  # noqa: E402
from bench_device import EVAL_BATCH, GPU_WORKERS, choose_device  # noqa: E402
from bench_images import correct_mask, image_record, sidecar_path, top1_of  # noqa: E402
from bench_report import write_markdown  # noqa: E402
from bench_stats import RowsFile, run_pending, shard, within  # noqa: E402
from bench_timing import run_timing  # noqa: E402
from curlprune.errors import CurlpruneError  # noqa: E402
from curlprune.run.prune_core import full_float32, on_device  # noqa: E402

from bench_paths import CIFAR10_PNG as DATA, RESNET56 as WEIGHTS, RESULTS  # noqa: E402
MODEL = "cifar:resnet56"
SPLIT_SEED = 0  # the validation split, calibration and BN draws (fixed: every row sees the same data)

FULL = {"val_per_class": 500, "calib": 256, "bn_images": 2048, "monitor": 1000, "train": None, "test": None,
        "tp_steps": 400}
SMOKE = {"val_per_class": 20, "calib": 32, "bn_images": 128, "monitor": 100, "train": 1500, "test": 500,
         "tp_steps": 100}


class Bench:
    images: RowsFile | None = None  # the per-image records' sidecar (bench_images); None: not kept

    def __init__(self, out: Path, settings: dict, device: torch.device = torch.device("cpu"), amp: str | None = None,
                 workers: int = 0) -> None:
        import curlprune
        from curlprune.cost.analysis import model_cost_fn
        from curlprune.data import data
        from curlprune.data.valsplit import hold_out
        from curlprune.models import build, input_spec

        self.out, self.s = out, settings
        self.device, self.amp, self.workers = device, amp, workers
        self.eval_batch = EVAL_BATCH[device.type]
        started = time.time()
        splits = data.load_image_folder(DATA, splits=["train", "test"])
        train, test = splits["train"], splits["test"]
        if settings["train"]:
            train = data.calibration_subset(train, settings["train"], SPLIT_SEED)
            test = data.calibration_subset(test, settings["test"], SPLIT_SEED)
        split = hold_out(train, SPLIT_SEED, per_class=settings["val_per_class"])
        self.train, self.val, self.test = split.train, split.val, test
        self.decode_seconds = time.time() - started
        self.spec = input_spec(MODEL)
        self.example = torch.zeros(1, 3, 32, 32)
        self.teacher = build(MODEL, weights=str(WEIGHTS)).eval()
        self.groups = curlprune.trace(self.teacher, self.example)
        self.cost_fn = model_cost_fn(self.teacher, self.example, self.groups)
        self.full_macs, self.full_params = curlprune.count(self.teacher, self.example)
        calib = data.calibration_subset(self.train, settings["calib"], SPLIT_SEED)
        self.calib = tuple(map(torch.cat, zip(*data.batches(calib, self.spec, settings["calib"]))))
        bn = data.calibration_subset(self.train, settings["bn_images"], SPLIT_SEED + 1)
        self.bn_images = torch.cat([x for x, _ in data.batches(bn, self.spec, 256)])
        self.monitor = data.calibration_subset(self.val, settings["monitor"], SPLIT_SEED)
        self.score_cpu: dict[str, float] = {}
        self.score_device: dict[str, str] = {}
        self.digests: dict[tuple[float, str], str] = {}  # (target, family) -> pruned_digest of its cached model

    # ------------------------------------------------------------------ measurements

    def correct(self, model: nn.Module, split: str) -> torch.Tensor:
        """Bool [images]: which val or test images ``model`` classifies correctly, on the bench's
        device (a copy of ``model`` moved there when it is elsewhere; bench_images.correct_mask)."""
        ds = self.val if split == "val" else self.test
        return correct_mask(on_device(model, self.device), ds, self.spec, self.eval_batch)

    def top1(self, model: nn.Module, split: str) -> float:
        """Top-1 (%) on val or test, rounded to 0.01 (bench_images.top1_of of :meth:`correct`)."""
        return top1_of(self.correct(model, split))

    def record(self, model: nn.Module, row_id: str) -> dict:
        """The per-image record of ``model`` as row ``row_id``'s final model (bench_images.image_record)."""
        return image_record(row_id, self.correct(model, "val"), self.correct(model, "test"))

    def final_top1(self, model: nn.Module, row_id: str) -> dict:
        """``{"val_top1", "test_top1"}`` of a row's final model; its per-image record goes to the
        sidecar (:attr:`images`) at once (:meth:`record`; first line of an id wins)."""
        record = self.record(model, row_id)
        if self.images is not None:
            self.images.append(record)
        return {"val_top1": record["val_top1"], "test_top1": record["test_top1"]}

    def bn_reestimated(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` on the bench's device with its BN statistics re-estimated."""
        import curlprune

        return curlprune.recalibrate_bn(copy.deepcopy(model).to(self.device), self.bn_images, len(self.bn_images)).eval()

    def device_fields(self) -> dict:
        """What every row records about where it ran (bench_stats.run_on reads them)."""
        fields = {"device": self.device.type, "amp": self.amp or "off"}
        if self.device.type == "cuda":
            fields.update(gpu=torch.cuda.get_device_name(self.device), workers=self.workers)
        return fields

    def shape(self, model: nn.Module, target: float) -> dict:
        import curlprune

        macs, params = curlprune.count(model, self.example)
        modules = dict(model.named_modules())
        stream = [modules[f"layer{k}.8.conv2"].out_channels for k in (1, 2, 3)]
        return {"macs": macs, "params": params, "macs_ratio": round(macs / self.full_macs, 4),
                "params_ratio": round(params / self.full_params, 4), "stream_widths": stream,
                "within_1pct": within(macs, target * self.full_macs)}

    # ------------------------------------------------------------------ scores (shared, cached)

    def scores(self, criterion: str, fresh: bool = False) -> tuple[dict, float]:
        """Scores of the unpruned model on the calibration images and their seconds; cached in
        --out/scores/<criterion>.npz (computed by one process at a time, on the bench's device in
        float32, TF32 off; a cached file is used whatever device computed it, as the prune stage
        does, docs/method.md §10; its meta names the device)."""
        from curlprune.criteria import compute_scores

        path = self.out / "scores" / f"{criterion}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            if path.is_file() and not fresh:
                with np.load(path, allow_pickle=False) as stored:
                    meta = json.loads(str(stored["__meta__"]))
                    scores = {k: stored[k] for k in stored.files if k != "__meta__"}
                if meta.get("calib") != self.s["calib"] or meta.get("seed") != SPLIT_SEED:
                    raise SystemExit(f"{path} was computed with other settings ({meta}): delete it")
                self.score_cpu[criterion] = float(meta.get("cpu_seconds", meta["seconds"]))
                self.score_device[criterion] = meta.get("device", "cpu")
                return scores, float(meta["seconds"])
            images, labels = self.calib
            scorer = on_device(self.teacher, self.device)  # the teacher itself on the CPU
            started, cpu = time.time(), time.process_time()
            with full_float32():
                scores = compute_scores(criterion, scorer, self.groups, images=images, labels=labels, seed=SPLIT_SEED)
            meta = {"criterion": criterion, "calib": self.s["calib"], "seed": SPLIT_SEED, "seconds": time.time() - started,
                    "cpu_seconds": time.process_time() - cpu, "device": self.device.type}
            np.savez(path, __meta__=np.array(json.dumps(meta)), **scores)
            self.score_cpu[criterion] = meta["cpu_seconds"]
            self.score_device[criterion] = self.device.type
            return scores, meta["seconds"]

    # ------------------------------------------------------------------ pruned models (cached per family and target)

    def cache_paths(self, family: str, target: float) -> tuple[Path, Path, Path]:
        """The cache folder of a pruned model, its weights file and its prune.json (written last)."""
        folder = self.out / f"t{target:g}" / family
        return folder, folder / ("pruned-gather.safetensors" if family.startswith("tp-") else "pruned.safetensors"), folder / "prune.json"

    def load_cached(self, family: str, path: Path) -> nn.Module:
        import curlprune
        from safetensors.torch import load_file
        from tp_equivalent import load_gather_model
        return (load_gather_model(self.teacher, load_file(str(path))) if family.startswith("tp-") else curlprune.load(path)).eval()

    def cached_digest(self, target: float, family: str) -> str | None:
        """bench_alias.pruned_digest of the cached pruned model of ``family`` at ``target`` (the
        cache is written once, so the digest is kept), None when the cache has no such model."""
        if (target, family) not in self.digests:
            _, path, info_path = self.cache_paths(family, target)
            if not info_path.is_file() or not path.is_file():  # prune.json is written after the weights
                return None
            self.digests[target, family] = pruned_digest(self.load_cached(family, path))
        return self.digests[target, family]

    def pruned(self, family: str, target: float) -> tuple[nn.Module, dict]:
        import curlprune
        from safetensors.torch import save_file

        from curlprune.store.rundir import atomic_write_text

        folder, path, info_path = self.cache_paths(family, target)
        folder.mkdir(parents=True, exist_ok=True)
        tp = family.startswith("tp-")
        with open(folder / "prune.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            if path.is_file() and info_path.is_file():
                return self.load_cached(family, path), json.loads(info_path.read_text())
            model, info = self.tp_prune(family, target) if tp else self.curl_prune(family, target)
            if tp:
                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
            else:
                curlprune.save(path, MODEL, info.pop("plan"), model.state_dict(), input_shape=list(self.example.shape))
            atomic_write_text(info_path, json.dumps(info, indent=1))
            return model.eval(), info

    def curl_prune(self, family: str, target: float) -> tuple[nn.Module, dict]:
        import curlprune
        from curlprune.select.allocation import Allocation, allocate, named_allocation
        from curlprune.select.search import Target

        if family.startswith("alloc:"):
            criterion, fields = bp.EXPLORE[family[len("alloc:"):]]
            allocation = Allocation(**fields)
        else:
            criterion, name, _ = bp.CURL[family]
            allocation = named_allocation(name, floor=bp.FLOOR)
        started = time.time()
        scores, score_seconds = self.scores(criterion)
        selection = allocate(self.groups, scores, self.cost_fn, Target("macs", target), allocation)
        model = curlprune.apply(self.teacher, self.groups, selection.plan).eval()
        info = {"plan": selection.plan, "criterion": criterion, "allocation": allocation.as_dict(),
                "score_seconds": round(score_seconds, 1), "prune_seconds": round(time.time() - started, 1)}
        if self.score_device[criterion] != "cpu":  # unset: scored on the CPU (every row before --device)
            info["score_device"] = self.score_device[criterion]
        return model, info

    def tp_prune(self, family: str, target: float) -> tuple[nn.Module, dict]:
        import curlprune
        from tp_equivalent import tp_prune

        settings = bp.tp_settings(family)
        model, record = tp_prune(self.teacher, self.example, settings["importance"], target * self.full_macs,
                                 lambda m: curlprune.count(m, self.example)[0], calib=self.calib,
                                 max_pruning_ratio=settings["max_pruning_ratio"], shortcuts_in=settings["shortcuts_in"],
                                 iterative_steps=self.s["tp_steps"])
        return model, {**settings, "prune_seconds": round(record.pop("seconds"), 1), "tp": record}

    # ------------------------------------------------------------------ rows

    def resolve(self, row: bp.Row, done: dict) -> str | None:
        """The TP variant "TP best" stands for at this target: best val top-1 after the seed-0
        recovery of the same epochs as the plan's variant rows; None while one is unfinished."""
        variants = [bp.Row(v, row.target, self.variant_epochs, 0).id for v in self.variants]
        if any(v not in done for v in variants):
            return None
        best = max(variants, key=lambda v: (done[v]["val_top1"], -self.variants.index(done[v]["family"])))
        return done[best]["family"]

    def run_row(self, row: bp.Row, done: dict) -> dict | None:
        if row.kind == "timing":
            return run_timing(self, row, SPLIT_SEED)  # bench_timing
        family, record = row.family, {}
        if family == "tp-best":
            family = self.resolve(row, done)
            if family is None:
                return None
            record["resolved_to"] = family
        started, cpu = time.time(), time.process_time()
        model, info = self.pruned(family, row.target)
        record.update(id=row.id, family=row.family, target=row.target, epochs=row.epochs, seed=row.seed, kind=row.kind,
                      **self.shape(model, row.target), prune=info, **self.device_fields())
        record["prune_cpu_seconds"] = round(time.process_time() - cpu, 1)  # ~0 when the pruned model was cached
        record["pruned_sha256"] = pruned_digest(model)
        same = find_same(row.id, row.kind, (row.target, row.epochs, row.seed), record["pruned_sha256"], record, done,
                         lambda r: r.get("pruned_sha256") or self.cached_digest(r["target"], r.get("resolved_to") or r["family"]))
        if same is not None:  # the same pruned model, seed and epochs: the same numbers (bench_alias)
            return {**alias_record(record, done[same]), "wall_seconds": round(time.time() - started, 1)}
        wall, cpu = time.time(), time.process_time()
        bn_model = self.bn_reestimated(model)
        record.update(val_raw=self.top1(model, "val"), test_raw=self.top1(model, "test"))
        if row.epochs:
            record.update(val_bn=self.top1(bn_model, "val"), test_bn=self.top1(bn_model, "test"))
        else:  # the BN-re-estimated model is the row's final model: its record is kept
            bn = self.final_top1(bn_model, row.id)
            record.update(val_bn=bn["val_top1"], test_bn=bn["test_top1"])
        record.update(eval_seconds=round(time.time() - wall, 1), eval_cpu_seconds=round(time.process_time() - cpu, 1))
        if row.epochs:
            wall, cpu = time.time(), time.process_time()
            record.update(self.recover(bn_model, row))
            record["recovery_cpu_seconds"] = round(time.process_time() - cpu, 1)
        else:
            record.update(val_top1=record["val_bn"], test_top1=record["test_bn"])
        record["wall_seconds"] = round(time.time() - started, 1)
        return record

    def recover(self, student: nn.Module, row: bp.Row) -> dict:
        from curlprune.recover.distill import DistillConfig, distill

        cfg = DistillConfig(epochs=row.epochs, batch_size=64, lr=0.02, warmup_epochs=0.2, seed=row.seed, progress=False,
                            ce_weight=0.0,  # the paper's loss, as in every row so far, whatever the default
                            device=str(self.device), amp=self.amp, num_workers=self.workers,
                            eval_batch_size=self.eval_batch if self.device.type == "cuda" else DistillConfig.eval_batch_size)
        folder = distill_folder(self.out, row.target, row.family, row.epochs, row.seed, self.amp)
        result = distill(student, copy.deepcopy(self.teacher), {"train": self.train, "test": self.monitor}, self.spec, cfg,
                         run_dir=folder)
        model = result.model.eval()  # top1 evaluates it on the bench's device
        return {**self.final_top1(model, row.id), "recovery_seconds": round(result.seconds, 1), "monitor_val_top1_last": result.last_top1,
                "train_images": len(self.train),
                "config": {"batch_size": cfg.batch_size, "lr": cfg.lr, "warmup_epochs": cfg.warmup_epochs,
                           "temperature": cfg.temperature, "alpha": cfg.alpha, "mixup_alpha": cfg.mixup_alpha, "ce_weight": cfg.ce_weight}}


def select(rows: list[bp.Row], pattern: str | None, shard_spec: str | None) -> list[bp.Row]:
    return shard([r for r in rows if selected(r.id, pattern)], shard_spec)


SUMMARY = ("macs_ratio", "val_top1", "test_top1", "resolved_to", "score_seconds")


def run(bench: Bench, rows: list[bp.Row], store: RowsFile, report, wait: bool) -> list[str]:
    """Run the unfinished rows in order with :func:`bench_stats.run_pending`: each finished row is
    appended to ``store`` and ``report()`` rewrites the markdown; a TP-best row waits (polling every
    60 s) for its variants, or with ``wait`` False is left. Returns the ids left unfinished."""
    def compute(row_id: str, done: dict) -> dict | None:
        return bench.run_row(bp.parse_id(row_id), done)  # None: TP best not resolvable yet

    return run_pending([r.id for r in rows], store, compute, report, wait=wait, log=lambda m: print(m, flush=True),
                       summary=lambda record: json.dumps({k: record.get(k) for k in SUMMARY}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the planned rows (done or not) and their estimated cost")
    parser.add_argument("--report", action="store_true", help="only rewrite the markdown from the rows file")
    parser.add_argument("--rows", default=None, help="only rows whose id matches one of these comma-separated globs")
    parser.add_argument("--shard", default=None, help="i/n: this process runs every n-th planned row from the i-th")
    parser.add_argument("--targets", type=float, nargs="+", default=list(bp.TARGETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(bp.SEEDS))
    parser.add_argument("--epochs", type=int, default=bp.EPOCHS, help="recovery epochs of the seeded rows")
    parser.add_argument("--long-epochs", type=int, default=bp.LONG_EPOCHS, help="recovery epochs of the long rows (0: none)")
    parser.add_argument("--no-wait", action="store_true", help="exit instead of waiting for another shard's TP variants")
    parser.add_argument("--smoke", action="store_true", help="tiny subset, 1 epoch, a few rows: proves the script end to end")
    parser.add_argument("--out", default=None, help="scores, pruned models, distill runs (default runs/bench-r56[-smoke])")
    parser.add_argument("--rows-file", default=None, help="JSON lines of finished rows (default benchmarks/results/cifar_resnet56.jsonl)")
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:<i>: scoring, BN re-estimation, evaluation and "
                        "recovery of every row (default cpu, one thread: the setting of the recorded rows)")
    parser.add_argument("--amp", default="off", choices=["off", "bf16"], help="mixed precision of the recovery (distill stage)")
    parser.add_argument("--workers", type=int, default=None, help=f"DataLoader workers of the recovery (default {GPU_WORKERS} on a GPU, 0 on the CPU)")
    parser.add_argument("--backfill-images", action="store_true", help="write the per-image records of finished rows that "
                        "have none (bench_backfill.py; --rows restricts, --out and --rows-file say where)")
    parser.add_argument("--extra-long-epochs", type=int, default=0, help="also plan kl-best and TP best at the first target, "
                        "seed 0, with this many recovery epochs (100: the literature's setting, for a GPU), after every other row")
    args = parser.parse_args()
    settings = SMOKE if args.smoke else FULL
    out = Path(args.out or ("runs/bench-r56-smoke" if args.smoke else "runs/bench-r56"))
    store = RowsFile(args.rows_file or (out / "rows.jsonl" if args.smoke else RESULTS / "cifar_resnet56.jsonl"))
    md = store.path.with_suffix(".md")
    plan = bp.smoke_plan() if args.smoke else bp.plan(args.targets, args.seeds, args.epochs, args.long_epochs,
                                                      extra_long_epochs=args.extra_long_epochs)
    rows = select(plan, args.rows, args.shard)
    variants = bp.variants_of(plan)
    variant_epochs = next((r.epochs for r in plan if r.family in bp.TP_VARIANTS), args.epochs)
    images = RowsFile(sidecar_path(store.path))  # the per-image records (bench_images)
    report = lambda: write_markdown(store.read(), md, variants=variants, variant_epochs=variant_epochs,  # noqa: E731
                                    settings=settings, smoke=args.smoke, images=images.read())
    if args.list:
        print("\n".join(bp.listing(rows, store.read())))
        return
    if args.report:
        report()
        print(f"wrote {md}")
        return
    try:
        device, amp = choose_device(args.device, args.amp)
        if args.workers is not None and args.workers < 0:
            raise CurlpruneError(f"--workers {args.workers}: give 0 or more DataLoader worker processes")
    except CurlpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    torch.set_num_threads(1)
    if not DATA.is_file() or not WEIGHTS.is_file():
        raise SystemExit(f"needs {DATA} and {WEIGHTS}")
    workers = args.workers if args.workers is not None else (GPU_WORKERS if device.type == "cuda" else 0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # batch shapes repeat: cuDNN's fastest kernels for them
    bench = Bench(out, settings, device, amp, workers)
    bench.variants, bench.variant_epochs = variants, variant_epochs
    bench.images = images
    if args.backfill_images:
        outcome = backfill(bench, store.read(), images, args.rows, log=lambda m: print(m, flush=True))
        print(", ".join(f"{len(v)} {k}" for k, v in outcome.items()) + f" ({images.path})")
        return
    print(f"decoded and split the data in {bench.decode_seconds:.0f} s: train {len(bench.train)}, val {len(bench.val)}, "
          f"test {len(bench.test)}; {len(rows)} rows selected", flush=True)
    if device.type != "cpu" or amp:
        print(f"device {device}, amp {amp or 'off'}, {workers} DataLoader workers", flush=True)
    run(bench, rows, store, report, wait=not args.no_wait)
    report()


if __name__ == "__main__":
    main()
