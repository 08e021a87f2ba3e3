"""docs/coverage.md from the coverage sweep's rows file alone (scripts/coverage_table.py --report).

No measuring here: every number comes from the rows (docs/coverage.jsonl), so the report can be
regenerated at any time, also while a sweep is running.
"""
from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

from coverage_measure import (DETECTORS, TIMM_MODELS, TIMM_SKIPPED, TOLERANCE, TOLERANCE_F64, all_names,
                              reason_kind)
from curlprune.store.rundir import atomic_write_text

HANDLED = ("ok", "partly")
FAILED = ("error", "crash", "unprunable", "SILENTLY WRONG")
LAUNCH = """\
Full sweep, from a checkout with the venv (`make install`), two shards in the background, one thread
each (`--tool both` by default: curlprune's and Torch-Pruning's row per model; a shard can be stopped
and started again at any time, finished rows are never measured again):

```sh
mkdir -p runs
for i in 0 1; do
  PYTHONPATH=src OMP_NUM_THREADS=1 setsid nohup .venv/bin/python scripts/coverage_table.py --shard $i/2 \\
    > runs/coverage-shard$i.log 2>&1 < /dev/null &
done
tail -f runs/coverage-shard*.log  # first line: "pid N (stop: kill N ...)"; then "[k/n] tool model: status (s)"
```

Then regenerate this file from `docs/coverage.jsonl` alone (also while the shards run):

```sh
PYTHONPATH=src .venv/bin/python scripts/coverage_table.py --report
```

Time: about 1-1.5 h of one thread for both tools on all 215 models (estimated from a 24-model subset
on this busy 2-core machine: curlprune 1-35 s per model, Torch-Pruning 0.6-1x that, 3-5x on models
torch.fx cannot trace; and the previous sweep's 2,008 s for 201 models, which included about 5 s of
imports per model that the forked processes no longer pay), so 30-60 min of wall time with two shards
when each gets a core, longer under load; the largest (vit_h_14, regnet_y_128gf, vit_l_16) come last
in the list and need a few GB of memory each.

Measure again: `--redo 'timm:vgg*'` (those rows are replaced), `--retry` (rows that timed out or were
killed); a subset: `--models 'segmentation:*,detection:*'`; one tool: `--tool curl`; what a shard
would run: `--list --shard 0/2`."""
NOT_TAKEN = (  # hand-written: what stays unprunable and why (kept from the previous docs/coverage.md)
    '- LayerNorm / GroupNorm over the channels (ConvNeXt and ConvNeXt-V2 residual streams, most hybrids): the',
    '  statistics change with the kept set, so the masked and the sliced model differ by construction; those',
    '  groups stay unprunable.',
    '- Grouped convs with a != b and a != 1 channels per conv group in and out: pruning inside conv groups',
    '  needs per-group input slicing.',
    "- ShuffleNet-V2's channel shuffle (`x.view(b, groups, c // groups, h, w)`): a constant at a channel",
    '  position of a view; the groups it touches stay unprunable with that reason.',
    '- Functional convs / linears on `get_attr` parameters (`F.conv2d(x, self.w)`): counted exactly,',
    '  channels unprunable.',
    '- Dense and multi-output models (torchvision FCN / DeepLabV3 / LRASPP, detector backbones with FPN):',
    '  pruned exactly (tests/test_coverage3.py); the KL, KL-approx and Taylor criteria need one',
    '  `[N, classes]` logits output and refuse these with one line naming l1, bn, random.',
    '- Taken since (tests/test_coverage3.py): `out[:, a:b]` with constant bounds (GhostModule with odd `oup`:',
    "  `apply` moves the bounds), timm BlurPool2d, GCNet's `matmul` over H·W (gcresnet33ts: 18 -> 28",
    "  prunable groups), norms over H/W (GRN's own reason now shows).",
    '- Taken since (tests/test_coverage3.py, issue 23): weight-standardised convs (timm StdConv2d / ScaledStdConv2d',
    '  and their Same forms; BiT `resnetv2_*x*_bit`, NFNets): removing input channels folds the standardisation',
    '  (computed over all inputs, as the masked model uses it) into a plain conv (`Conv2dSame` for dynamic',
    "  padding), exact and reproduced by a reload; ConvNeXt-V2's GlobalResponseNorm: its MLP hidden channels are",
    '  zeroed at its input and the sliced GRN keeps its mean over the original channel count (weight and eps',
    '  rescaled by C/C\'); its LayerNorm2d residual streams stay unprunable.',
    "- Taken since (tests/test_rms_norm.py, issue 23): RMS norms over the channels (timm RmsNorm2d / RmsNorm,",
    "  their Fp32 and Act forms, torch.nn.RMSNorm; MobileNet-V5): removed channels are zeroed at the norm's",
    "  input and the sliced norm keeps its mean over the original channel count (weight times sqrt(C/C'), eps",
    "  times C/C'); mobilenetv5_300m 0 -> 55 of 323 groups prunable. RMS norms without a weight, LayerNorm and",
    "  timm's SimpleNorm (x / std(x), the mean subtracted: `var over the channel dim`) stay unprunable.",
    '- Taken since (tests/test_yolo.py): channel `split` / `chunk` in each form YOLOv8\'s C2f is written in',
    '  (`list(x.chunk(2, 1))`, `split((c, c), 1)`, `list(x.split(k, 1))` with an int size, the last part',
    '  possibly shorter: each part its own group, `apply` cuts at the kept sizes), and a YOLOv8n built from',
    "  ultralytics' published definition in the tests (3,157,200 parameters as published; `ultralytics`",
    '  itself is not installed: it pulls opencv and polars, 130+ MB): C2f, SPPF, the FPN/PAN neck and the',
    '  Detect head with two outputs traced; 59 of its 81 groups prunable (every conv channel but the',
    "  head's box and class outputs, 4,960 of 5,392); masked == sliced on every output, `plan_cost == count`.",
    '- Taken since (tests/test_trace_fallback.py): models torch.fx cannot trace symbolically (a branch on a',
    "  shape, `int()`/`len()` of a size, TF 'same' padding's `max(pad, 0)`) are traced against the example",
    '  input, the graph specialised to its size with a guard at each such place (README, "Models torch.fx',
    '  cannot trace"; docs/method.md §1); a submodule that branches on tensor values is kept whole with the',
    '  reason (timm vgg11_bn, nasnetalarge, pnasnet5large, the MobileViTs and several hybrids now trace).',
    '- A channel count used as a value (`y * y.size(1) ** -0.5`): the group is unprunable with a reason naming',
    '  both nodes (a pruned model would compute with the new count).',
)


def handled(row: dict | None) -> bool:
    """curlprune handled the model: traced, a prunable group, masked == sliced, plan_cost == count."""
    return row is not None and row.get("status") in HANDLED


def share_of(row: dict) -> float | None:
    """The row's prunable share for the medians: the traced share when handled, 0 when curlprune
    fails on the model, None when it was not measured to the end (timeout, killed)."""
    if handled(row):
        return row["share"]
    return 0.0 if row.get("status") in FAILED else None


def median_share(rows: list[dict]) -> str:
    values = [v for v in map(share_of, rows) if v is not None]
    return f"{statistics.median(values):.1%} of {len(values)} models" if values else "no models yet"


def summary(rows: list[dict]) -> Counter:
    c = Counter(r["status"] for r in rows)
    c["measured"], c["handled"] = len(rows), c["ok"] + c["partly"]
    c["failed"], c["stopped"] = c["error"] + c["unprunable"] + c["crash"], c["timeout"] + c["killed"]
    return c


def fmt_status(row: dict) -> str:
    status = row["status"]
    if status == "SILENTLY WRONG":
        return f"**SILENTLY WRONG**: {'; '.join(row.get('wrong', []))}"
    if status in ("error", "crash", "timeout", "killed"):
        where = f" ({row['stage_failed']})" if row.get("stage_failed") else ""
        return f"{status}{where}: {row['error'].replace('|', '/')[:160]}"
    if status in ("partly", "unprunable"):
        counts = Counter(map(reason_kind, row["blocked_reasons"])) if "blocked_reasons" in row else row["reasons"]
        reasons = "; ".join(f"{k} ×{n}" if n > 1 else k for k, n in counts.items())
        return f"{status}: {reasons.replace('|', '/')[:220]}"
    return "ok"


def fmt_tp(row: dict | None) -> str:
    if row is None:
        return "-"
    if row["status"] == "ok":
        return f"ok ({row['params_tp'] / row['params_full']:.0%} of params kept)"
    return row["status"]


def fmt_row(row: dict, tp: dict | None) -> str:
    if "groups" not in row:
        return f"| {row['name']} | {row.get('input', '-')} | - | - | - | - | - | - | {fmt_status(row)} | {fmt_tp(tp)} |"
    diff = f"{row['diff']:.1e}" if "diff" in row else "-"
    if "diff_f64" in row:
        diff += f" (f64 {row['diff_f64']:.1e})"
    cost = "-"
    if "macs_plan" in row:
        same = (row["macs_plan"], row["params_plan"]) == (row["macs_applied"], row["params_applied"])
        cost = "yes" if same else f"no: {row['macs_plan']:,} vs {row['macs_applied']:,} MACs"
    return (f"| {row['name']} | {row['input']} | {row['groups']} ({row['prunable_groups']}) | "
            f"{row['channels_prunable']:,} / {row['channels_all']:,} | {row['share']:.1%} | {diff} | {cost} | "
            f"{row['trace_s']:.2f} | {fmt_status(row)} | {fmt_tp(tp)} |")


HEADER = ["| model | input | groups (prunable) | prunable channels / all | prunable share | max rel. diff | "
          "plan_cost = count | trace s | curlprune | Torch-Pruning |", "|---" * 10 + "|"]


def table(names: list[str], curl: dict, tp: dict, title: str, intro: str = "") -> list[str]:
    """One section: the rows of ``names`` that have a curlprune or a Torch-Pruning row."""
    lines = [f"## {title}", ""] + ([intro, ""] if intro else []) + HEADER
    for name in names:
        if name in curl:
            lines.append(fmt_row(curl[name], tp.get(name)))
        elif name in tp:
            lines.append(f"| {name} | {tp[name].get('input', '-')} | - | - | - | - | - | - | not measured | {fmt_tp(tp[name])} |")
    missing = [n for n in names if n not in curl and n not in tp]
    if missing:
        lines += ["", f"Not measured yet ({len(missing)}): {', '.join(missing)}."]
    return lines + [""]


def comparison(curl: dict, tp: dict) -> list[str]:
    """How many models each tool handles, on the models both measured, and the ones only one handles."""
    both = [n for n in curl if n in tp and curl[n]["status"] not in ("timeout", "killed")
            and tp[n]["status"] not in ("timeout", "killed")]
    ours = {n for n in both if handled(curl[n])}
    theirs = {n for n in both if tp[n]["status"] == "ok"}
    version = tp_version(tp)
    if not version:
        return []
    lines = [f"**Side by side** (the {len(both)} models measured by both tools, same weights and input): "
             f"curlprune handles {len(ours)}, Torch-Pruning {version} runs without error on {len(theirs)} "
             "(its step and a forward pass of the pruned model; Torch-Pruning's output is not checked "
             "against anything, curlprune's is checked masked == sliced and plan_cost == count)."]
    only_tp = sorted(theirs - ours)
    only_us = sorted(ours - theirs)
    lines.append(f"Torch-Pruning only ({len(only_tp)}): " + (", ".join(
        f"{n} (curlprune: {curl[n]['status']})" for n in only_tp) or "none") + ".")
    lines.append(f"curlprune only ({len(only_us)}): " + (", ".join(
        f"{n} (Torch-Pruning: {tp[n]['status']})" for n in only_us) or "none") + ".")
    return lines


def tp_version(tp: dict) -> str:
    return next((r["versions"].get("torch_pruning") for r in tp.values() if r.get("versions", {}).get("torch_pruning")), "")


def progress(rows: dict[str, dict], models: int) -> str:
    """How far the sweep is: (model, tool) rows finished, and the time they took."""
    seconds = {t: sum(r.get("wall_s", r.get("seconds", 0)) for r in rows.values() if r.get("tool") == t) for t in ("curl", "tp")}
    done = {t: sum(r.get("tool") == t for r in rows.values()) for t in ("curl", "tp")}
    return (f"Rows so far: curlprune {done['curl']} and Torch-Pruning {done['tp']} of {models} models each, "
            f"{seconds['curl'] / 3600:.2f} h and {seconds['tp'] / 3600:.2f} h of one thread (each row's own process, "
            "wall time).")


def render(rows: dict[str, dict]) -> str:
    """The text of docs/coverage.md from ``rows`` (id -> row, as RowsFile.read returns them)."""
    curl = {r["name"]: r for r in rows.values() if r.get("tool") == "curl"}
    tp = {r["name"]: r for r in rows.values() if r.get("tool") == "tp"}
    everything = all_names()
    tv_names = [n for n in everything if n.startswith("torchvision:")]
    timm_names = [f"timm:{a}" for _, _, a in TIMM_MODELS]
    dense_names = [n for n in everything if n.startswith(("segmentation:", "detection:"))]
    by_source = {"torchvision": tv_names, "timm": timm_names, "dense prediction": dense_names}
    tv, dense = [curl[n] for n in tv_names if n in curl], [curl[n] for n in dense_names if n in curl]
    timm_rows = [curl[n] for n in timm_names if n in curl]
    cnn = [r for r in timm_rows if r["kind"] in ("cnn", "hybrid")]
    transformers = [r for r in timm_rows if r["kind"] not in ("cnn", "hybrid")]

    def line(label: str, got: list[dict], total: int, extra: str = "") -> str:
        s = summary(got)
        return (f"**{label}**{extra}: {s['handled']} of {s['measured']} measured models handled ({s['ok']} fully "
                f"prunable, {s['partly']} with some groups unprunable for a stated reason; {total} in the sweep); "
                f"silently wrong: {s['SILENTLY WRONG']}; clear errors or nothing prunable: {s['error'] + s['unprunable']}; "
                f"crashes: {s['crash']}; timeouts/killed: {s['stopped']}.")

    families = {r["family"] for r in cnn}
    lines = ["<!-- generated by: python scripts/coverage_table.py --report (from docs/coverage.jsonl alone); "
             "do not edit -->", "# Architecture coverage", "", LAUNCH, "", progress(rows, len(everything)), "",
             line("torchvision classification", tv, len(tv_names)), "",
             line("timm CNNs and hybrids", cnn, sum(k in ("cnn", "hybrid") for _, k, _ in TIMM_MODELS),
                  f" ({len({r['family'] for r in cnn if handled(r)})} of {len(families)} families handled)"),
             line("timm transformers/MLPs", transformers, sum(k not in ("cnn", "hybrid") for _, k, _ in TIMM_MODELS),
                  " (outside the CNN scope, for information)"), "",
             line("dense prediction", dense, len(dense_names), " (torchvision segmentation models whole, detector "
                  "backbones with their FPN)"), "",
             "**Prunable share of channels**, median per source: " + "; ".join(
                 f"{src} {median_share([curl[n] for n in names if n in curl])}" for src, names in by_source.items()) + ".",
             ""]
    lines += comparison(curl, tp) + [""]
    lines += [
        "## How it is measured", "",
        "Each model: random weights (BN statistics, biases, layer scales and other vector parameters randomised),",
        "batch 1, eval mode, the smallest square input it accepts (32 to 384 pixels). *Handled*: traced, at least",
        "one prunable group, the sliced model (`apply`) equals the masked model (`mask`) for a seeded random plan",
        f"that prunes every prunable group (max relative difference over all outputs < {TOLERANCE:g}; above that",
        f"it is measured again in float64, < {TOLERANCE_F64:g}), and the analytic `plan_cost` equals `count` of",
        "the pruned model (MACs and params) and of the unpruned one. *ok*: every group but the model input/output",
        "prunable; *partly*: some groups unprunable, with the reasons (×count); *error*: a one-line",
        "`CurlpruneError`; *crash*: any other exception (a bug: the user gets no clear message); **SILENTLY",
        "WRONG**: a check above failed without an error. Groups column: channel groups (prunable groups).",
        "",
        "*Prunable share of channels* = prunable channels / all channels, where *all channels* is the sum of",
        "the widths of every channel group the trace finds (a channel group: the tensors that must keep the same",
        "channels, counted once however many layers read or write it; the model input and output groups",
        "included) and *prunable channels* the same sum over the prunable groups. The medians count a model",
        "curlprune fails on (error, crash, nothing prunable, silently wrong) as 0 and leave out a model not",
        "measured to the end (timeout, killed).",
        "",
        "*Torch-Pruning* column (scripts/coverage_tp.py): `MetaPruner` with `GroupMagnitudeImportance(p=2)`, 50%",
        "per layer (`pruning_ratio=0.5`, no global ranking), `ignored_layers` = the final classifier (every",
        "conv/linear that produces a model output, directly or through BN and activations, and for classifiers",
        "and segmentation every conv/linear with as many outputs as classes), one `step()`, then a forward pass:",
        "*ok (k% of params kept)* when it runs, the output shapes are unchanged and parameters were removed;",
        "else the exception class and where it was raised (*build graph*, *step*, *forward*), or *output shape",
        "changed*. Torch-Pruning's pruned model is not compared with anything: *ok* means it runs.",
        "",
    ]
    wrong = [r for r in curl.values() if r["status"] == "SILENTLY WRONG"]
    if wrong:
        lines += ["## Silently wrong", ""] + [f"- {r['name']}: {'; '.join(r.get('wrong', []))}" for r in wrong] + [""]
    lines += table(tv_names, curl, tp, "torchvision")
    lines += table(timm_names, curl, tp, "timm", "Family and kind (cnn / hybrid with conv stages / transformer) in "
                   "the rows file; the table lists timm's CNNs, hybrids and transformers in `TIMM_MODELS` order.")
    lines += ["timm modules not swept: " + "; ".join(f"{k} ({v})" for k, v in TIMM_SKIPPED.items()) + ".", ""]
    lines += table(dense_names, curl, tp, "Dense prediction", "torchvision's segmentation models whole (dict "
                   "outputs `out`, `aux`) and the backbones with FPN of " + ", ".join(DETECTORS) + " (`model.backbone`, "
                   "an OrderedDict of feature maps), built with `weights=None, weights_backbone=None`.")
    reasons = Counter()
    for r in curl.values():
        reasons.update({reason_kind(x) for x in r.get("blocked_reasons", [])} or set(r.get("reasons", {})))
    if reasons:
        lines += ["## Why groups are unprunable (number of models)", ""]
        lines += [f"- {k}: {n}" for k, n in reasons.most_common()] + [""]
    lines += ["## Not taken (yet), and why", "", *NOT_TAKEN, ""]
    versions = next((r["versions"] for r in curl.values() if "versions" in r), {})
    commits = Counter(r.get("versions", {}).get("curlprune_commit", "?") for r in curl.values())
    lines += ["Measured with " + ", ".join(f"{k} {v}" for k, v in versions.items() if v and k != "curlprune_commit")
              + ", 1 thread; curlprune commit " + ", ".join(f"{c} ({n} models)" for c, n in commits.most_common()) + "."]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write the report through a temporary file and a rename (never half-written)."""
    atomic_write_text(path, text)
