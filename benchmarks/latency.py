"""Latency benchmark: measured CPU speed-up of pruned models against their MACs ratio.

Models (pruned by curlprune's global selection to a MACs target):
  r56-50, r56-30  CIFAR ResNet-56 (../shared/models/resnet56-4bfd9763.th) to 50% / 30% of its MACs,
                  criterion kl (the default) on 256 calibration images of ../shared/data/cifar10-png.zip
  r50-50          torchvision resnet50 to 50% at 224x224        } random weights, BN statistics and
  mbv2-50         torchvision mobilenet_v2 to 50% at 224x224    } affine set to seeded non-trivial
  effb0-50        torchvision efficientnet_b0 to 50% at 224x224 } values; criterion l1 (see below)

Runtimes: PyTorch eager (channels_last, torch.inference_mode) on the models as they are ("torch": the
pruned model is the traced GraphModule of curlprune.apply), the same after
curlprune.optimize_for_inference on both models ("torch-opt": BN folded into the convs, residual adds
in place; what the latency target measures), and ONNX Runtime (CPU provider, which folds BN itself) on
the model exported with curlprune.export_onnx. Batch 64 for CIFAR, 8 at 224 (64 takes too long here), and
batch 1; 1 intra-op thread and all cores. Every pruned model is timed interleaved with its unpruned
model in the same run (curlprune.cost.latency.time_interleaved: alternating order, median of per-round
ratios), so the speed-up is a ratio from one run on a shared, noisy machine.

Latency-target rows: ResNet-56 (batch 64) and resnet50 (batch 8), 1 thread, --target-latency 0.5:
curlprune.select.latency_select.select_latency, then the chosen plan re-measured afterwards.

    python benchmarks/latency.py [--models r56-50,r56-30,r50-50,mbv2-50,effb0-50] [--out runs/bench-latency]

writes benchmarks/results/latency.json, latency.md and latency.png; resumable (finished rows are kept,
re-run to continue; kl scores are cached in --out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from curlprune.errors import CurlpruneError

from bench_paths import CIFAR10_PNG as CIFAR_DATA, RESNET56 as CIFAR_WEIGHTS, RESULTS

# name: (registry model, weights, MACs target, criterion, input size, big batch)
MODELS = {
    "r56-50": ("cifar:resnet56", CIFAR_WEIGHTS, 0.5, "kl", 32, 64),
    "r56-30": ("cifar:resnet56", CIFAR_WEIGHTS, 0.3, "kl", 32, 64),
    "r50-50": ("torchvision:resnet50", None, 0.5, "l1", 224, 8),
    "mbv2-50": ("torchvision:mobilenet_v2", None, 0.5, "l1", 224, 8),
    "effb0-50": ("torchvision:efficientnet_b0", None, 0.5, "l1", 224, 8),
}
ROUND_TO = (None, 8, 16)
TARGET_ROWS = {"r56-50": ("cifar:resnet56", 64), "r50-50": ("torchvision:resnet50", 8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--runtimes", default="torch,torch-opt,ort")
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}")
    parser.add_argument("--targets", default=",".join(TARGET_ROWS), help="latency-target rows ('' for none)")
    parser.add_argument("--out", default="runs/bench-latency", help="cache: scores, ONNX files")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--max-rounds", type=int, default=15)
    parser.add_argument("--ort-kernels-only", action="store_true",
                        help="only count the convs ONNX Runtime runs in its blocked NCHWc layout, for the ONNX files in --out")
    parser.add_argument("--profile", default=None, metavar="MODEL",
                        help="only profile MODEL's operators (torch eager, big batch, 1 thread): unpruned vs round_to none / 8")
    args = parser.parse_args()
    out, results = Path(args.out), Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    state = _load(results / "latency.json")
    if args.profile or args.ort_kernels_only:  # analyses live in their own file (rows are written by other runs)
        analysis_path = results / "latency_analysis.json"
        analysis = json.loads(analysis_path.read_text()) if analysis_path.is_file() else {}
        if args.profile:
            analysis.setdefault("profiles", {})[args.profile] = _profile(args.profile, out)
        if args.ort_kernels_only:
            analysis["ort_kernels"] = _ort_kernels(out)
        from curlprune.store.rundir import atomic_write_text

        atomic_write_text(analysis_path, json.dumps(analysis, indent=1) + "\n")
        _write(state, results)
        return
    command = "python benchmarks/latency.py " + " ".join(sys.argv[1:])
    state["commands"] = [*(c for c in state.get("commands", []) if c != command), command]
    state["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs shared with other processes, torch {torch.__version__}"
    threads = [int(t) for t in args.threads.split(",")]
    names = args.models.split(",")
    # most informative first: the big batch on 1 thread for every model, then the latency targets,
    # then all cores, then batch 1
    phases = [("big", threads[0])] + [("big", t) for t in threads[1:]] + [("one", t) for t in threads]
    for i, (batch, n_threads) in enumerate(phases):
        for name in names:
            _bench_model(name, state, out, results, args.runtimes.split(","), batch, n_threads, args.max_rounds)
        if i == 0:
            for name in filter(None, args.targets.split(",")):
                _target_row(name, state, out, results)
    _write(state, results)


# ---------------------------------------------------------------------------------------------- models


def _build(name: str):
    from curlprune.cost.analysis import trace
    from curlprune.models import build

    model_name, weights, _, _, size, _ = MODELS[name]
    torch.manual_seed(0)
    model = build(model_name, weights=str(weights) if weights else None).eval()
    if weights is None:
        _nontrivial_bn(model)
    example = torch.zeros(1, 3, size, size)
    return model, example, trace(model, example)


def _nontrivial_bn(model: torch.nn.Module) -> None:
    """Seeded BN statistics and affine parameters away from the init's identity (1, 0, 0, 1)."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=gen))


def _scores(name: str, model, groups, out: Path) -> tuple[dict, float]:
    """Scores of the model's criterion, cached in ``out`` (kl on ResNet-56 takes minutes)."""
    from curlprune.criteria import compute_scores

    model_name, _, _, criterion, _, _ = MODELS[name]
    path = out / f"scores-{model_name.replace(':', '-')}-{criterion}.npz"
    if path.is_file():
        with np.load(path) as stored:
            meta = json.loads(str(stored["__meta__"]))
            return {k: stored[k] for k in stored.files if k != "__meta__"}, meta["seconds"]
    images = None
    if criterion in ("kl", "kl-approx"):
        from curlprune.data.data import batches, calibration_subset, load_image_folder
        from curlprune.models import input_spec

        splits = load_image_folder(CIFAR_DATA, splits=["train"])
        subset = calibration_subset(splits["train"], 256, 0)
        images = torch.cat([x for x, _ in batches(subset, input_spec(model_name), 256)])
    started = time.time()
    scores = compute_scores(criterion, model, groups, images=images, seed=0)
    seconds = time.time() - started
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, __meta__=np.array(json.dumps({"criterion": criterion, "seconds": seconds})), **scores)
    tmp.replace(path)
    return scores, seconds


def _pruned(name: str, model, example, groups, scores, round_to):
    """The plan ``curlprune prune`` makes with its defaults for this criterion (allocation included)."""
    from curlprune.select.allocation import allocate, default_allocation, named_allocation
    from curlprune.models import default_protect
    from curlprune.cost.analysis import model_cost_fn
    from curlprune.select.search import Target
    from curlprune.surgery.surgery import apply

    model_name, _, target, criterion, _, _ = MODELS[name]
    protect = default_protect(model_name, model, groups)
    sel = allocate(groups, scores, model_cost_fn(model, example, groups), Target("macs", target),
                   named_allocation(default_allocation(criterion)), protect=protect, round_to=round_to)
    return apply(model, groups, sel.plan).eval(), sel


def _bench_model(name, state, out, results, runtimes, batch_kind, n_threads, max_rounds) -> None:
    from curlprune.cost.latency import compare_latency, example_batch, prepare

    if name not in MODELS:
        raise SystemExit(f"unknown model {name}: use {', '.join(MODELS)}")
    _, _, _, criterion, size, big = MODELS[name]
    batches = (big,) if batch_kind == "big" else (1,)
    threads = (n_threads,)
    # a forward of batch 8 at 224 takes seconds here: fewer warm-up calls and rounds
    slow = size >= 224 and batches[0] > 1
    timing = {"warmup": 1, "min_rounds": 5, "max_rounds": min(max_rounds, 9)} if slow else {"max_rounds": max_rounds}
    keys = [_key(name, rt, b, t, r) for b in batches for t in threads for rt in runtimes for r in ROUND_TO]
    if all(k in state["rows"] for k in keys):
        return
    model, example, groups = _build(name)
    scores, seconds = _scores(name, model, groups, out)
    state.setdefault("scores_seconds", {})[name] = round(seconds, 1)
    pruned = {}
    for r in ROUND_TO:
        try:
            pruned[r] = _pruned(name, model, example, groups, scores, r)
        except CurlpruneError as exc:  # e.g. round_to 16 on ResNet-56's 16-wide first stage
            pruned[r] = str(exc)
    references = {False: prepare(model, optimize=False), True: prepare(model)}
    for batch in batches:
        for n_threads in threads:
            for runtime in runtimes:
                for r in ROUND_TO:
                    key = _key(name, runtime, batch, n_threads, r)
                    if key in state["rows"]:
                        continue
                    if isinstance(pruned[r], str):
                        state["rows"][key] = {"model": name, "runtime": runtime, "batch": batch, "threads": n_threads,
                                              "round_to": r, "unreachable": pruned[r]}
                        continue
                    small, sel = pruned[r]
                    started, load = time.time(), os.getloadavg()[0]
                    if runtime in ("torch", "torch-opt"):
                        optimize = runtime == "torch-opt"
                        c = compare_latency(prepare(small, optimize), references[optimize], example, batch=batch,
                                            threads=n_threads, prepared=True, **timing)
                        ratio, ms_small, ms_full, noise, rounds = c.ratio, c.candidate_ms, c.reference_ms, c.noise, c.rounds
                    else:
                        ratio, ms_small, ms_full, noise, rounds = _ort_compare(
                            name, r, model, small, example_batch(example, batch), n_threads, out, timing)
                    state["rows"][key] = {
                        "model": name, "runtime": runtime, "batch": batch, "threads": n_threads, "round_to": r,
                        "criterion": criterion, "macs_ratio": sel.macs / sel.full_macs,
                        "ideal_speedup": sel.full_macs / sel.macs, "speedup": 1.0 / ratio,
                        "quotient": (1.0 / ratio) / (sel.full_macs / sel.macs),
                        "ms_pruned": ms_small, "ms_unpruned": ms_full, "noise": noise, "rounds": rounds,
                        "seconds": round(time.time() - started, 1), "load": round(load, 2),
                    }
                    print(f"{key}: MACs {sel.macs / sel.full_macs:.3f}, speed-up {1 / ratio:.2f}x "
                          f"(ideal {sel.full_macs / sel.macs:.2f}x), {ms_full:.2f} -> {ms_small:.2f} ms", flush=True)
                    _write(state, results)


def _ort_compare(name, round_to, model, small, x, threads, out, timing):
    import onnxruntime as ort

    from curlprune.store.checkpoint import export_onnx
    from curlprune.cost.latency import time_interleaved

    sessions = {}
    for label, m in (("reference", model), ("candidate", small)):
        path = out / f"{name}-{'full' if label == 'reference' else f'r{round_to}'}.onnx"
        if not path.is_file():
            export_onnx(m, torch.zeros(1, *x.shape[1:]), path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sessions[label] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"input": x.contiguous().numpy()}
    t = time_interleaved({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()},
                         reference="reference", **timing)
    return (t.ratio("candidate", "reference"), t.median_ms("candidate"), t.median_ms("reference"),
            t.noise("candidate", "reference"), len(t.seconds["reference"]))


def _profile(name: str, out: Path) -> dict:
    """Milliseconds per batch by operator (torch profiler, self time, 3 passes) of the unpruned model
    and its plans without and with round_to 8, each as it is and optimised for inference: where the
    time goes that the MACs do not show."""
    from curlprune.cost.latency import example_batch, prepare

    model, example, groups = _build(name)
    scores, _ = _scores(name, model, groups, out)
    x = example_batch(example, MODELS[name][5])
    result = {}
    torch.set_num_threads(1)
    variants = [(label + suffix, r, optimize) for optimize, suffix in ((False, ""), (True, ", optimised"))
                for label, r in (("unpruned", "full"), ("round_to none", None), ("round_to 8", 8))]
    for label, r, optimize in variants:
        m = prepare(model, optimize) if r == "full" else prepare(_pruned(name, model, example, groups, scores, r)[0], optimize)
        with torch.inference_mode():
            for _ in range(2):
                m(x)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    m(x)
        ms = {e.key: e.self_cpu_time_total / 3e3 for e in prof.key_averages()}
        conv = sum(v for k, v in ms.items() if "conv" in k)
        result[label] = {"total_ms": sum(ms.values()), "conv_ms": conv,
                         "batch_norm_ms": sum(v for k, v in ms.items() if "batch_norm" in k),
                         "add_relu_ms": sum(v for k, v in ms.items() if k in ("aten::add", "aten::add_", "aten::relu", "aten::relu_", "aten::clamp_min", "aten::clamp_min_"))}
        if r != "full" and not optimize:
            result[label]["kept_widths"] = sorted(len(v) for v in _pruned(name, model, example, groups, scores, r)[1].plan.values())
    return result


def _ort_kernels(out: Path) -> dict:
    """Per exported model: convs ONNX Runtime (all optimisations, this CPU) puts in its blocked NCHWc
    layout vs left on the plain path, and the layout reorders it inserts between them."""
    import tempfile

    import onnx
    import onnxruntime as ort

    counts = {}
    for path in sorted(out.glob("*.onnx")):
        with tempfile.TemporaryDirectory() as tmp:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
            options.intra_op_num_threads = 1
            options.log_severity_level = 3
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            nodes = onnx.load(options.optimized_model_filepath).graph.node
        convs = [n for n in nodes if n.op_type in ("Conv", "FusedConv")]
        counts[path.stem] = {
            "nchwc_convs": sum(n.domain == "com.microsoft.nchwc" for n in convs),
            "plain_convs": sum(n.domain != "com.microsoft.nchwc" for n in convs),
            "reorders": sum(n.op_type in ("ReorderInput", "ReorderOutput") for n in nodes),
        }
    return counts


def _target_row(name, state, out, results) -> None:
    """--target-latency 0.5 at the big batch, 1 thread: the MACs ratio it lands at, re-measured after."""
    from curlprune.select.allocation import default_allocation, named_allocation, ranking_scores
    from curlprune.cost.latency import LatencyTarget, compare_latency
    from curlprune.select.latency_select import measured_cost_fn, select_latency
    from curlprune.models import default_protect
    from curlprune.cost.analysis import model_cost_fn
    from curlprune.surgery.surgery import apply

    key = f"{name}|target-latency 0.5"
    if key in state.setdefault("targets", {}):
        return
    model_name, batch = TARGET_ROWS[name]
    model, example, groups = _build(name)
    scores, _ = _scores(name, model, groups, out)
    started = time.time()
    timing = {"warmup": 1, "min_rounds": 5, "max_rounds": 9} if batch > 1 and MODELS[name][4] >= 224 else {"max_rounds": 15}
    measured = measured_cost_fn(model, groups, example, batch=batch, threads=1, **timing)
    ranked, normalize = ranking_scores(groups, scores, named_allocation(default_allocation(MODELS[name][3])), "latency")
    chosen = select_latency(groups, ranked, measured, model_cost_fn(model, example, groups), LatencyTarget.parse("0.5"),
                            protect=default_protect(model_name, model, groups), normalize=normalize)
    search_seconds = time.time() - started
    again = compare_latency(apply(model, groups, chosen.plan), model, example, batch=batch, threads=1, **timing)
    sel = chosen.selection
    state["targets"][key] = {
        "model": name, "batch": batch, "threads": 1, "criterion": MODELS[name][3], "goal": chosen.goal,
        "macs_ratio": sel.macs / sel.full_macs, "achieved_search": chosen.achieved, "remeasured": again.ratio,
        "remeasured_ms": again.candidate_ms, "unpruned_ms": again.reference_ms, "evaluations": chosen.evaluations,
        "searches": chosen.searches, "tolerance": chosen.tolerance, "note": chosen.note, "seconds": round(search_seconds, 1),
    }
    print(f"{key}: MACs ratio {sel.macs / sel.full_macs:.3f}, latency {chosen.achieved:.3f} (re-measured {again.ratio:.3f})", flush=True)
    _write(state, results)


# ---------------------------------------------------------------------------------------------- output


def _load_range(rows: dict) -> str:
    loads = [r["load"] for r in rows.values() if "load" in r]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "not recorded"


def _key(name, runtime, batch, threads, round_to) -> str:
    return f"{name}|{runtime}|b{batch}|t{threads}|r{round_to or 0}"


def _load(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"rows": {}, "targets": {}}


def _write(state: dict, results: Path) -> None:
    """Write the results, first taking in rows another process of this benchmark wrote meanwhile."""
    from curlprune.store.rundir import atomic_write_text

    disk = _load(results / "latency.json")
    for section in ("rows", "targets", "scores_seconds"):
        for key, value in disk.get(section, {}).items():
            state.setdefault(section, {}).setdefault(key, value)
    atomic_write_text(results / "latency.json", json.dumps(state, indent=1) + "\n")
    analysis_path = results / "latency_analysis.json"
    analysis = json.loads(analysis_path.read_text()) if analysis_path.is_file() else {}
    atomic_write_text(results / "latency.md", _markdown({**state, **analysis}))
    _plot(state, results / "latency.png")


FINDINGS = """**Findings** (issue 10's goal: at batch 64, or 8 at 224, measured speed-up >= 0.8 x the MACs ratio for the ResNets):

- resnet50 at 50% of the MACs (batch 8) realises 0.95-1.05 of the ideal speed-up in PyTorch, on 1 and 2 threads.
- ResNet-56 at 50% (batch 64, 1 thread, quiet machine): 0.83 of the ideal once both models are optimised for
  inference (`torch-opt`: 1.68x for an ideal 2.01x), 0.98 with `round_to` 8 (1.97x). As sliced, without the
  optimisation, 0.69 (1.38x). On 2 threads 0.72 (0.83 with `round_to` 8).
- ResNet-56 at 30% falls short: 0.60 (`torch-opt`, 1 thread), 0.73 with `round_to` 8. Why, from the profile below and
  the kept widths: (1) the residual stream keeps all 16/32/64 channels, so the stream's convs' outputs, the adds and the
  ReLUs do not shrink; (2) the inside convs are cut to 4-13 channels, and oneDNN computes a conv in blocks of 8/16
  channels, so a 4-channel conv costs about what an 8- or 16-channel one does (`round_to` 8 turns the cut into real
  savings, and the selection removes more elsewhere to meet the target, hence its larger ideal); (3) at these sizes a
  pass is a few hundred microseconds per layer, and fixed per-call costs are a larger share of a smaller model.
- Before the optimisation pass, the traced model paid for its out-of-place residual adds (torch.fx records
  `out += identity` as an out-of-place add): in the profile, add + ReLU took 20 ms of the pruned model's 178 ms against
  11 of the unpruned model's 230; batch norm, which the pruned stream keeps whole, took 29 ms. `optimize_for_inference`
  folds BN into the convs and adds in place (after it: BN 0 ms, add + ReLU 8-10 ms).
- Batch 1 gains less everywhere (ResNet-56: 1.1-1.4x in PyTorch; ONNX Runtime, with less overhead per call, 1.3-1.8x):
  a 32x32 image gives the kernels too little work per call for the removed channels to show.
- ONNX Runtime needs `round_to` 8 (see "Why ONNX Runtime gains less" below): efficientnet_b0 0.99x as cut, 2.38x with
  `round_to` 8.
"""


def _markdown(state: dict) -> str:
    rows = state["rows"]
    lines = [
        "# Measured CPU latency of pruned models vs their MACs ratio",
        "",
        "Command: `python benchmarks/latency.py` (every row; resumable: finished rows are kept). This run was split into",
        "parallel processes: " + "; ".join(f"`{c}`" for c in state.get("commands", [])) + ".",
        f"Machine: {state.get('machine', '')}; 1-minute load average when the rows started: {_load_range(rows)}.",
        "",
        "Speed-up = unpruned latency / pruned latency, the median over interleaved rounds of one run; ideal = unpruned MACs /",
        "pruned MACs; quotient = speed-up / ideal (1.0 = the MACs saving is fully realised). r8, r16: the same target with",
        "kept widths rounded up to multiples of 8 / 16 (`round_to`): their ideal and measured speed-up.",
        "Criterion: kl (CURL's default) for ResNet-56; **l1** for the torchvision models (random weights, so any criterion",
        "only decides which widths are cut; l1 avoids hours of kl scoring at 224); each with `curlprune prune`'s default",
        "allocation for it (kl: cost-weighted, l1: paper). Runtimes: `torch` = PyTorch eager on the models as they are (the",
        "pruned one is the traced GraphModule of `curlprune.apply`); `torch-opt` = both models after",
        "`curlprune.optimize_for_inference` (BN folded into the convs, residual adds in place: what the latency target",
        "measures); `ort` = ONNX Runtime, CPU provider, all graph optimisations (it folds BN itself).",
        "",
        FINDINGS,
        "",
        "| model | runtime | batch | threads | unpruned ms | pruned ms | MACs ratio | ideal | speed-up | quotient | r8 ideal / speed-up | r16 ideal / speed-up | noise |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    seen = set()
    runtimes = ["torch", "torch-opt", "ort"]
    order = sorted(rows, key=lambda k: (rows[k]["batch"] == 1, rows[k]["threads"], list(MODELS).index(rows[k]["model"]),
                                        runtimes.index(rows[k]["runtime"]) if rows[k]["runtime"] in runtimes else 9))
    for key in order:
        row = rows[key]
        if row["round_to"] is not None or "unreachable" in row:
            continue
        base = key.rsplit("|", 1)[0]
        if base in seen:
            continue
        seen.add(base)
        extras = []
        for r in (8, 16):
            other = rows.get(f"{base}|r{r}")
            if other and "unreachable" in other:
                extras.append(f"unreachable at round_to {r}")
            else:
                extras.append(f"{other['ideal_speedup']:.2f}x / {other['speedup']:.2f}x" if other else "-")
        lines.append(
            f"| {row['model']} | {row['runtime']} | {row['batch']} | {row['threads']} | {row['ms_unpruned']:.2f} | "
            f"{row['ms_pruned']:.2f} | {row['macs_ratio']:.3f} | {row['ideal_speedup']:.2f}x | **{row['speedup']:.2f}x** | "
            f"{row['quotient']:.2f} | {extras[0]} | {extras[1]} | {row['noise']:.3f} |"
        )
    targets = state.get("targets", {})
    if targets:
        lines += [
            "",
            "## `--target-latency 0.5` (1 thread): where the measured search stops",
            "",
            "| model | batch | criterion | MACs ratio landed at | latency (search) | latency re-measured | unpruned ms | plans measured | search s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in targets.values():
            lines.append(f"| {row['model']} | {row['batch']} | {row['criterion']} | {row['macs_ratio']:.3f} | {row['achieved_search']:.3f} | "
                         f"{row['remeasured']:.3f} | {row['unpruned_ms']:.2f} | {row['evaluations']} | {row['seconds']:.0f} |")
    kernels = state.get("ort_kernels", {})
    if kernels:
        lines += [
            "",
            "## Why ONNX Runtime gains less without `round_to` 8",
            "",
            "ONNX Runtime's CPU provider runs a conv in its blocked NCHWc layout (8 channels per block with AVX2, as here)",
            "only when its channel counts are multiples of the block; other convs stay on the plain path, with layout",
            "reorders in between. Convs per optimised model (`--ort-kernels-only`):",
            "",
            "| ONNX model | NCHWc convs | plain convs | reorders |",
            "|---|---|---|---|",
        ]
        for stem, c in kernels.items():
            lines.append(f"| {stem} | {c['nchwc_convs']} | {c['plain_convs']} | {c['reorders']} |")
    for name, prof in state.get("profiles", {}).items():
        lines += [
            "",
            f"## Where the time goes: {name}, PyTorch eager, batch {MODELS[name][5]}, 1 thread (`--profile {name}`)",
            "",
            "| model | total ms | conv ms | batch-norm ms | add + ReLU ms | conv share |",
            "|---|---|---|---|---|---|",
        ]
        for label, p in prof.items():
            lines.append(f"| {label} | {p['total_ms']:.0f} | {p['conv_ms']:.0f} | {p['batch_norm_ms']:.0f} | {p['add_relu_ms']:.0f} | {p['conv_ms'] / p['total_ms']:.2f} |")
        for label, p in prof.items():
            if "kept_widths" in p:
                lines.append(f"\nKept widths of the pruned groups, {label}: {', '.join(map(str, p['kept_widths']))}.")
    scores = state.get("scores_seconds", {})
    lines += ["", "noise: relative uncertainty of the speed-up (IQR of the per-round ratios / sqrt(rounds) / median).",
              "Scoring seconds (cached after the first run): " + ", ".join(f"{k} {v:.0f}s" for k, v in scores.items()), ""]
    return "\n".join(lines)


def _plot(state: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from curlprune.store.rundir import atomic_write

    rows = [r for r in state["rows"].values() if r["round_to"] is None and "unreachable" not in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    top = max(max(r["ideal_speedup"] for r in rows), max(r["speedup"] for r in rows)) * 1.1
    ax.plot([1, top], [1, top], color="grey", lw=1, label="speed-up = MACs ratio")
    ax.plot([1, top], [0.8, 0.8 * top], color="grey", lw=1, ls="--", label="0.8 x MACs ratio")
    markers = {"torch": "o", "torch-opt": "^", "ort": "s"}
    colours = {m: f"C{i}" for i, m in enumerate(MODELS)}
    for r in rows:
        big = r["batch"] > 1
        ax.scatter(r["ideal_speedup"], r["speedup"], marker=markers.get(r["runtime"], "x"), s=50 if big else 25,
                   facecolors=colours.get(r["model"], "k") if big else "none", edgecolors=colours.get(r["model"], "k"))
    for m, c in colours.items():
        if any(r["model"] == m for r in rows):
            ax.scatter([], [], color=c, label=m)
    ax.scatter([], [], marker="o", color="k", label="PyTorch eager, as sliced")
    ax.scatter([], [], marker="^", color="k", label="PyTorch eager, optimize_for_inference")
    ax.scatter([], [], marker="s", color="k", label="ONNX Runtime")
    ax.set_xlabel("ideal speed-up (unpruned MACs / pruned MACs)")
    ax.set_ylabel("measured speed-up")
    ax.set_title("CPU speed-up vs MACs ratio (filled: big batch, hollow: batch 1)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png")

    atomic_write(path, write)
    plt.close(fig)


if __name__ == "__main__":
    main()
