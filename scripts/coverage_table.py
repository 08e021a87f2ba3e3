"""Coverage sweep: which models curlprune can prune, measured, and docs/coverage.md from the results.

    python scripts/coverage_table.py sweep [--only torchvision|timm|NAME,...] [--timeout 900] [--redo]
    python scripts/coverage_table.py render [--out docs/coverage.md]
    python scripts/coverage_table.py one NAME OUT.json          (one model; what sweep runs per model)

``sweep`` runs every classification model of ``torchvision.models.list_models(module=torchvision.models)``
and a member of every timm family (``TIMM_MODELS`` below; timm is the optional extra
``pip install curlprune[timm]``), each in its own subprocess with a time limit, so that a crash,
a hang or an out-of-memory kill of one model never stops the sweep. Each model's result is one JSON
file in docs/coverage-data/; a rerun skips the models that have one (``--redo`` to measure again,
``--retry`` to measure again only those that timed out or crashed), so the sweep is resumable.

Per model (random weights; BN statistics, biases, layer scales and other vector parameters randomised
so that a wrongly handled channel cannot hide behind an init value; batch 1; eval mode; the smallest
square input of ``SIZES`` the model accepts):

* trace time, groups, prunable groups, prunable channels / all channels, unprunable reasons;
* masked == sliced for one seeded random plan that prunes every prunable group
  (max |sliced - masked| / max |masked|; above TOLERANCE in float32 it is measured again in float64,
  which separates round-off from a real difference);
* ``plan_cost(plan) == count(apply(plan))`` (MACs and params), and the same for the empty plan;
* status: ``ok`` (every group but the model input/output prunable), ``partly`` (some groups unprunable,
  with their reasons), ``unprunable`` (nothing prunable), ``error`` (a one-line CurlpruneError),
  ``crash`` (any other exception: a bug, since users should get a clear error), ``timeout``, and
  ``SILENTLY WRONG`` (masked != sliced, or the analytic cost != the measured cost of the pruned model).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "docs" / "coverage-data"
DOC = ROOT / "docs" / "coverage.md"
TOLERANCE = 1e-4  # float32 relative difference for masked vs sliced
TOLERANCE_F64 = 1e-8  # the same in float64: anything above is a real difference, not round-off
SIZES = (32, 64, 96, 128, 160, 192, 224, 240, 256, 288, 299, 320, 331, 384)
IO_REASONS = {"model input", "feeds the model output"}

# Family -> members swept. The families the issue names first (CNNs and hybrids with conv stages),
# then one member of every other timm module (``timm.list_modules()``), transformers included.
TIMM_MODELS: list[tuple[str, str, str]] = [  # (family, kind, timm architecture)
    ("resnet", "cnn", "resnet18"), ("resnet", "cnn", "resnet50d"), ("resnet", "cnn", "resnet26t"),
    ("resnet", "cnn", "seresnext26d_32x4d"), ("resnet", "cnn", "ecaresnet26t"),
    ("resnetv2", "cnn", "resnetv2_50"), ("resnetv2", "cnn", "resnetv2_50x1_bit"),
    ("resnest", "cnn", "resnest14d"), ("res2net", "cnn", "res2net50_26w_4s"),
    ("regnet", "cnn", "regnetx_002"), ("regnet", "cnn", "regnety_002"), ("regnet", "cnn", "regnetz_005"),
    ("efficientnet", "cnn", "efficientnet_b0"), ("efficientnet", "cnn", "efficientnet_lite0"),
    ("efficientnet", "cnn", "efficientnetv2_rw_t"), ("tf_efficientnet", "cnn", "tf_efficientnet_b0"),
    ("tf_efficientnet", "cnn", "tf_efficientnetv2_b0"),
    ("mobilenetv3", "cnn", "mobilenetv3_small_050"), ("mobilenetv3", "cnn", "tf_mobilenetv3_small_minimal_100"),
    ("mobilenetv4", "cnn", "mobilenetv4_conv_small"), ("mobilenetv4", "hybrid", "mobilenetv4_hybrid_medium"),
    ("ghostnet", "cnn", "ghostnet_050"), ("ghostnet", "cnn", "ghostnetv2_100"), ("rexnet", "cnn", "rexnet_100"),
    ("dla", "cnn", "dla34"), ("dpn", "cnn", "dpn48b"), ("hrnet", "cnn", "hrnet_w18_small"),
    ("cspnet", "cnn", "cspresnet50"), ("cspnet", "cnn", "cs3darknet_s"), ("darknet", "cnn", "darknet17"),
    ("vovnet", "cnn", "ese_vovnet19b_dw"), ("convnext", "cnn", "convnext_atto"), ("convnextv2", "cnn", "convnextv2_atto"),
    ("edgenext", "hybrid", "edgenext_xx_small"), ("repvgg", "cnn", "repvgg_a0"), ("mobileone", "cnn", "mobileone_s0"),
    ("fastvit", "hybrid", "fastvit_t8"), ("efficientformer", "hybrid", "efficientformer_l1"),
    ("levit", "hybrid", "levit_128s"), ("levit", "hybrid", "levit_conv_128s"),
    ("nfnet", "cnn", "nf_regnet_b0"), ("nfnet", "cnn", "nf_resnet26"),
    ("xception", "cnn", "legacy_xception"), ("xception", "cnn", "xception41"),
    ("inception", "cnn", "inception_v3"), ("inception", "cnn", "inception_v4"), ("inception", "cnn", "inception_resnet_v2"),
    ("densenet", "cnn", "densenet121"), ("selecsls", "cnn", "selecsls42b"), ("tresnet", "cnn", "tresnet_m"),
    ("hardcorenas", "cnn", "hardcorenas_a"), ("lcnet", "cnn", "lcnet_050"),
    # one member of every other timm module
    ("byobnet", "cnn", "gernet_s"), ("byobnet", "cnn", "resnet32ts"), ("byoanet", "hybrid", "eca_halonext26ts"),
    ("convmixer", "cnn", "convmixer_768_32"), ("cpubone", "cnn", "cpubone_nano"), ("cspnext", "cnn", "cspnext_tiny"),
    ("efficientformer_v2", "hybrid", "efficientformerv2_s0"), ("efficientvim", "hybrid", "efficientvim_m1"),
    ("efficientvit_mit", "hybrid", "efficientvit_b0"), ("efficientvit_msra", "hybrid", "efficientvit_m0"),
    ("fasternet", "cnn", "fasternet_t0"), ("hgnet", "cnn", "hgnetv2_b0"), ("inception_next", "cnn", "inception_next_atto"),
    ("lcnetv2", "cnn", "lcnetv2_small"), ("lowformer", "hybrid", "lowformer_b0"), ("mambaout", "cnn", "mambaout_femto"),
    ("maxxvit", "hybrid", "coatnet_nano_rw_224"), ("maxxvit", "hybrid", "maxvit_pico_rw_256"),
    ("metaformer", "cnn", "poolformer_s12"), ("metaformer", "cnn", "convformer_s18"),
    ("mobilenetv5", "hybrid", "mobilenetv5_300m"), ("mobilevit", "hybrid", "mobilevit_xxs"),
    ("mobilevit", "hybrid", "mobilevitv2_050"), ("nextvit", "hybrid", "nextvit_small"), ("rdnet", "cnn", "rdnet_tiny"),
    ("repghost", "cnn", "repghostnet_050"), ("repvit", "cnn", "repvit_m0_9"), ("senet", "cnn", "legacy_seresnet18"),
    ("shvit", "hybrid", "shvit_s1"), ("sknet", "cnn", "skresnet18"), ("starnet", "cnn", "starnet_s050"),
    ("swiftformer", "hybrid", "swiftformer_xs"), ("tiny_vit", "hybrid", "tiny_vit_5m_224"),
    ("vgg", "cnn", "vgg11_bn"), ("visformer", "hybrid", "visformer_tiny"),
    ("vision_transformer_hybrid", "hybrid", "vit_tiny_r_s16_p8_224"), ("coat", "hybrid", "coat_lite_tiny"),
    ("convit", "transformer", "convit_tiny"), ("csatv2", "hybrid", "csatv2"), ("davit", "transformer", "davit_tiny"),
    ("focalnet", "transformer", "focalnet_tiny_srf"), ("gcvit", "hybrid", "gcvit_xxtiny"), ("iformer", "hybrid", "iformer_t"),
    ("pvt_v2", "transformer", "pvt_v2_b0"), ("twins", "transformer", "twins_pcpvt_small"), ("nest", "transformer", "nest_tiny"),
    ("pit", "transformer", "pit_ti_224"), ("sequencer", "transformer", "sequencer2d_s"),
    ("swin_transformer", "transformer", "swin_tiny_patch4_window7_224"),
    ("swin_transformer_v2", "transformer", "swinv2_tiny_window8_256"),
    ("swin_transformer_v2_cr", "transformer", "swinv2_cr_tiny_224"), ("hiera", "transformer", "hiera_tiny_224"),
    ("hieradet_sam2", "transformer", "hieradet_small"), ("mvitv2", "transformer", "mvitv2_tiny"),
    ("xcit", "transformer", "xcit_nano_12_p16_224"), ("volo", "transformer", "volo_d1_224"),
    ("vision_transformer", "transformer", "vit_tiny_patch16_224"), ("deit", "transformer", "deit_tiny_patch16_224"),
    ("vision_transformer_relpos", "transformer", "vit_relpos_small_patch16_224"),
    ("eva", "transformer", "eva02_tiny_patch14_224"), ("cait", "transformer", "cait_xxs24_224"),
    ("crossvit", "transformer", "crossvit_tiny_240"), ("tnt", "transformer", "tnt_s_patch16_224"),
    ("mlp_mixer", "transformer", "mixer_s32_224"), ("vitamin", "hybrid", "vitamin_small_224"),
    ("beit", "transformer", "beit_base_patch16_224"), ("vision_transformer_sam", "transformer", "samvit_base_patch16_224"),
    ("nasnet", "cnn", "nasnetalarge"), ("pnasnet", "cnn", "pnasnet5large"),
]
# timm modules not swept, and why (the sweep says so instead of silently leaving them out)
TIMM_SKIPPED = {
    "deepseek_vit": "vision encoders of 400M+ parameters for language models, not classifiers",
    "gemma4_vit": "vision encoders for language models, not classifiers",
    "qwen3_vit": "vision encoders for language models, not classifiers",
    "naflexvit": "variable-resolution patch-sequence ViT (takes a dict of patches, not an image tensor)",
}
# torchvision models measured last (largest first-forward cost on a 2-core CPU)
HEAVY = {
    "vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_128gf", "regnet_y_32gf", "regnet_x_32gf", "regnet_y_16gf",
    "efficientnet_b7", "efficientnet_v2_l", "efficientnet_b6", "vit_b_16", "swin_v2_b", "swin_b", "maxvit_t",
}


# ----------------------------------------------------------------------------------------------
# one model (runs in a child process)


def family_of(name: str) -> tuple[str, str]:
    """(family, kind) of a ``torchvision:``/``timm:`` name for the table."""
    prefix, _, arch = name.partition(":")
    if prefix == "timm":
        for family, kind, a in TIMM_MODELS:
            if a == arch:
                return family, kind
        return "timm", "?"
    return "torchvision", "vit" if arch.startswith(("vit_", "swin", "maxvit")) else "cnn"


def build_random(name: str, seed: int = 0):
    """The architecture with random weights; norm statistics and vector parameters randomised."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    prefix, _, arch = name.partition(":")
    if prefix == "timm":
        from curlprune.models.timm_family import build

        model = build(arch)
    elif prefix == "torchvision":
        import torchvision

        model = torchvision.models.get_model(arch, weights=None)
    else:
        from curlprune.models import build

        model = build(name)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        norms = set()
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                n = module.num_features
                module.running_mean.copy_(0.5 * torch.randn(n, generator=g))
                module.running_var.copy_(0.5 + torch.rand(n, generator=g))
                if module.weight is not None:
                    module.weight.copy_(0.5 + torch.rand(n, generator=g))
                    module.bias.copy_(0.5 * torch.randn(n, generator=g))
                    norms.update((id(module.weight), id(module.bias)))
        for p in model.parameters():
            # biases, layer scales (1e-6 at init), LN/GRN affine: a zero/one init would hide a wrong slice
            if id(p) not in norms and p.numel() > 0 and p.numel() == max(p.shape, default=1):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def smallest_input(model) -> tuple[int, ...]:
    """The smallest square 3-channel input of SIZES the model runs on (batch 1)."""
    import torch

    last = None
    for size in SIZES:
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, size, size))
            return (1, 3, size, size)
        except Exception as exc:  # noqa: BLE001 - any failure means "not this size"
            last = exc
    raise RuntimeError(f"no input size of {SIZES[0]}..{SIZES[-1]} works ({type(last).__name__}: {first_line(last)})")


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def reason_kind(reason: str) -> str:
    """A reason without the node/module names, for counting kinds of reasons across models."""
    text = reason.split(" at node ")[0].split(" at ")[0]
    text = re.sub(r"\b(?!torch\.|_operator\.|builtins\.)[A-Za-z_]\w*(?:\.\w+)+\b", "<module>", text)
    return re.sub(r"(?<![A-Za-z_])\d+", "N", text)


def relative(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def measure(name: str) -> dict:
    """Every number of one row; exceptions propagate to ``one`` (which records them)."""
    import copy

    import torch

    from curlprune.cost.cost import count
    from curlprune.cost.analysis import plan_cost
    from curlprune.cost.analysis import trace
    from curlprune.surgery.surgery import apply, mask, random_plan

    row: dict = {"stage": "build"}
    model = build_random(name)
    row["stage"] = "input"
    shape = smallest_input(model)
    row["input"] = "x".join(map(str, shape))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    row["stage"] = "trace"
    start = time.perf_counter()
    groups = trace(model, x)
    row["trace_s"] = round(time.perf_counter() - start, 3)
    prunable = [g for g in groups if g.prunable]
    blocked = [g for g in groups if not g.prunable and g.reason not in IO_REASONS]
    row.update(
        groups=len(groups),
        prunable_groups=len(prunable),
        channels_prunable=sum(g.width for g in prunable),
        channels_all=sum(g.width for g in groups),
        blocked_groups=len(blocked),
        blocked_channels=sum(g.width for g in blocked),
        reasons=dict(Counter(reason_kind(g.reason) for g in blocked).most_common()),
        reason_examples=[f"{g.name}: {g.reason}" for g in blocked[:5]],
        blocked_reasons=[g.reason for g in blocked[:300]],
        units=sorted({g.unit for g in prunable}),
    )
    row["stage"] = "plan"
    plan = random_plan(groups, random.Random(name))
    row["stage"] = "mask/apply"
    with torch.no_grad():
        full = model(x)
        with mask(model, groups, plan):
            masked = model(x)
        small = apply(model, groups, plan)
        sliced = small(x)
        row["finite"] = bool(torch.isfinite(full).all() and torch.isfinite(masked).all())
        row["diff"] = relative(sliced, masked)
        row["plan_changes_output"] = relative(masked, full) > 1e-3
        if not row["diff"] < TOLERANCE:  # round-off or real? float64 says
            model64, small64 = copy.deepcopy(model).double(), copy.deepcopy(small).double()
            with mask(model64, groups, plan):
                masked64 = model64(x.double())
            row["diff_f64"] = relative(small64(x.double()), masked64)
    row["stage"] = "cost"
    row["macs_plan"], row["params_plan"] = plan_cost(model, x, groups, plan)
    row["macs_applied"], row["params_applied"] = count(small, x)
    row["macs_full_plan"], row["params_full_plan"] = plan_cost(model, x, groups, {})
    row["macs_full"], row["params_full"] = count(model, x)
    row["stage"] = "done"
    return row


def status_of(row: dict) -> str:
    """The row's status (see the module docstring)."""
    if "error" in row:
        return row.get("kind_of_error", "crash")
    wrong = []
    diff = row["diff_f64"] if "diff_f64" in row else row["diff"]
    if not diff < (TOLERANCE_F64 if "diff_f64" in row else TOLERANCE):
        wrong.append("masked != sliced")
    if (row["macs_plan"], row["params_plan"]) != (row["macs_applied"], row["params_applied"]):
        wrong.append("plan_cost != count(apply)")
    if (row["macs_full_plan"], row["params_full_plan"]) != (row["macs_full"], row["params_full"]):
        wrong.append("plan_cost({}) != count(model)")
    if wrong:
        row["wrong"] = wrong
        return "SILENTLY WRONG"
    if row["prunable_groups"] == 0:
        return "unprunable"
    return "partly" if row["blocked_groups"] else "ok"


def one(name: str, out: Path, commit: str) -> int:
    """Measure ``name`` and write its JSON row to ``out`` (also on failure)."""
    import torch

    torch.set_num_threads(1)
    begin = time.perf_counter()
    row: dict = {"name": name}
    try:
        row.update(measure(name))
    except Exception as exc:  # noqa: BLE001 - a row per model, whatever happens
        from curlprune.errors import CurlpruneError

        stage = row.get("stage", "?")
        row.update(getattr(exc, "_row", {}))
        row["error"] = f"{type(exc).__name__}: {first_line(exc)}"
        row["error_one_line"] = "\n" not in str(exc).strip()
        row["kind_of_error"] = "error" if isinstance(exc, CurlpruneError) else "crash"
        row["traceback_tail"] = traceback.format_exc().strip().splitlines()[-6:]
        row["stage_failed"] = stage
    row["seconds"] = round(time.perf_counter() - begin, 1)
    finish(row, commit)
    write_row(out, row)
    return 0


def finish(row: dict, commit: str) -> None:
    import torch
    import torchvision

    try:
        import timm

        timm_version = timm.__version__
    except ImportError:
        timm_version = None
    row["family"], row["kind"] = family_of(row["name"])
    row["status"] = status_of(row)
    row["versions"] = {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm_version,
                       "curlprune_commit": commit, "python": platform.python_version()}


def write_row(out: Path, row: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1, sort_keys=True) + "\n")
    tmp.replace(out)


# ----------------------------------------------------------------------------------------------
# the sweep (parent process)


def all_names() -> list[str]:
    import torchvision

    tv = torchvision.models.list_models(module=torchvision.models)
    light = [f"torchvision:{a}" for a in tv if a not in HEAVY]
    heavy = [f"torchvision:{a}" for a in tv if a in HEAVY]
    timm = [f"timm:{a}" for _, _, a in TIMM_MODELS]
    return light + timm + heavy


def path_of(name: str) -> Path:
    return DATA / (name.replace(":", "__").replace("/", "_") + ".json")


def git_commit() -> str:
    """The measured code's commit (COVERAGE_COMMIT when the sweep runs from an exported snapshot)."""
    if os.environ.get("COVERAGE_COMMIT"):
        return os.environ["COVERAGE_COMMIT"]
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def sweep(names: list[str], timeout: float, redo: bool, retry: bool) -> int:
    commit = git_commit()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    for k, name in enumerate(names, 1):
        out = path_of(name)
        if out.exists() and not redo:
            old = json.loads(out.read_text())
            if not (retry and old.get("status") in ("timeout", "crash", "killed")):
                continue
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, __file__, "one", name, str(out), commit], env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        seconds = round(time.perf_counter() - start, 1)
        if rc != 0 or not out.exists() or json.loads(out.read_text()).get("name") != name:
            row = {"name": name, "seconds": seconds}
            if rc is None:
                row.update(error=f"no result within {timeout:.0f} s", kind_of_error="timeout")
            else:
                row.update(error=f"the process died (exit {rc}; out of memory?)", kind_of_error="killed")
            finish(row, commit)
            write_row(out, row)
        row = json.loads(out.read_text())
        print(f"[{k}/{len(names)}] {name}: {row['status']} ({seconds} s) {row.get('error', '')}", flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# docs/coverage.md


def load_rows() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(DATA.glob("*.json"))]


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


def fmt_row(row: dict) -> str:
    if "groups" not in row:
        return f"| {row['name']} | {row.get('input', '-')} | - | - | - | - | - | {fmt_status(row)} |"
    diff = f"{row['diff']:.1e}" if "diff" in row else "-"
    if "diff_f64" in row:
        diff += f" (f64 {row['diff_f64']:.1e})"
    cost = "-"
    if "macs_plan" in row:
        same = (row["macs_plan"], row["params_plan"]) == (row["macs_applied"], row["params_applied"])
        cost = "yes" if same else f"no: {row['macs_plan']:,} vs {row['macs_applied']:,} MACs"
    channels = f"{row['channels_prunable']} / {row['channels_all']}"
    return (f"| {row['name']} | {row['input']} | {row['groups']} ({row['prunable_groups']}) | {channels} | {diff} | "
            f"{cost} | {row['trace_s']:.2f} | {fmt_status(row)} |")


def summary(rows: list[dict]) -> dict[str, int]:
    c = Counter(r["status"] for r in rows)
    return {"measured": len(rows), "ok": c["ok"], "partly": c["partly"], "handled": c["ok"] + c["partly"], **{
        k: c[k] for k in ("unprunable", "error", "crash", "timeout", "killed", "SILENTLY WRONG")}}


def render() -> str:
    import torchvision

    rows = {r["name"]: r for r in load_rows()}
    tv_all = [f"torchvision:{a}" for a in torchvision.models.list_models(module=torchvision.models)]
    tv = [rows[n] for n in tv_all if n in rows]
    timm_rows = [rows[f"timm:{a}"] for _, _, a in TIMM_MODELS if f"timm:{a}" in rows]
    lines = ["<!-- generated by: python scripts/coverage_table.py render (from docs/coverage-data/*.json; "
             "measure with: python scripts/coverage_table.py sweep); do not edit -->", "# Architecture coverage", ""]
    s_tv = summary(tv)
    cnn = [r for r in timm_rows if r["kind"] in ("cnn", "hybrid")]
    s_cnn, s_tr = summary(cnn), summary([r for r in timm_rows if r["kind"] not in ("cnn", "hybrid")])
    families = {r["family"] for r in cnn}
    families_handled = {r["family"] for r in cnn if r["status"] in ("ok", "partly")}
    lines += [
        f"**torchvision**: {s_tv['handled']} of {len(tv_all)} classification models handled "
        f"({s_tv['ok']} fully prunable, {s_tv['partly']} with some groups unprunable for a stated reason); "
        f"{s_tv['measured']} of {len(tv_all)} measured so far; silently wrong: {s_tv['SILENTLY WRONG']}; "
        f"clear errors: {s_tv['error'] + s_tv['unprunable']}; crashes/timeouts: {s_tv['crash'] + s_tv['timeout'] + s_tv['killed']}. "
        "(Torch-Pruning states 77 of 85 torchvision models.)",
        "",
        f"**timm CNNs and hybrids**: {s_cnn['handled']} of {s_cnn['measured']} models handled, "
        f"{len(families_handled)} of {len(families)} families ({s_cnn['ok']} fully); silently wrong: {s_cnn['SILENTLY WRONG']}; "
        f"clear errors: {s_cnn['error'] + s_cnn['unprunable']}; crashes/timeouts: {s_cnn['crash'] + s_cnn['timeout'] + s_cnn['killed']}.",
        f"**timm transformers/MLPs** (outside the CNN scope, for information): {s_tr['handled']} of {s_tr['measured']} handled; "
        f"silently wrong: {s_tr['SILENTLY WRONG']}.",
        "",
        "Each model: random weights (BN statistics, biases, layer scales and other vector parameters randomised),",
        "batch 1, eval mode, the smallest square input it accepts. *Handled*: traced, at least one prunable group,",
        f"the sliced model (`apply`) equals the masked model (`mask`) for a seeded random plan that prunes every",
        f"prunable group (max relative difference < {TOLERANCE:g}; above that it is measured again in float64,",
        f"< {TOLERANCE_F64:g}), and the analytic `plan_cost` equals `count` of the pruned model (MACs and params)",
        "and of the unpruned one. *ok*: every group but the model input/output prunable; *partly*: some groups",
        "unprunable, with the reasons (×count); *error*: a one-line `CurlpruneError`; *crash*: any other exception",
        "(a bug: the user gets no clear message); **SILENTLY WRONG**: a check above failed without an error.",
        "Groups column: groups (prunable groups). Channels are counted once per group.",
        "",
    ]
    wrong = [r for r in rows.values() if r["status"] == "SILENTLY WRONG"]
    if wrong:
        lines += ["## Silently wrong", ""] + [f"- {r['name']}: {'; '.join(r.get('wrong', []))}" for r in wrong] + [""]
    header = ["| model | input | groups | prunable channels / all | max rel. diff | plan_cost = count | trace s | status |",
              "|---|---|---|---|---|---|---|---|"]
    lines += ["## torchvision", ""] + header + [fmt_row(r) for r in tv]
    missing = [n for n in tv_all if n not in rows]
    if missing:
        lines += ["", f"Not measured yet: {', '.join(missing)}."]
    lines += ["", "## timm", "", "Family and kind (cnn / hybrid with conv stages / transformer) in the first column.", ""]
    lines += ["| family | " + header[0][2:], "|---" + header[1]]
    lines += [f"| {r['family']} ({r['kind']}) " + fmt_row(r) for r in timm_rows]
    missing = [f"timm:{a}" for _, _, a in TIMM_MODELS if f"timm:{a}" not in rows]
    if missing:
        lines += ["", f"Not measured yet: {', '.join(missing)}."]
    lines += ["", "timm modules not swept: " + "; ".join(f"{k} ({v})" for k, v in TIMM_SKIPPED.items()) + "."]
    reasons = Counter()
    for r in rows.values():
        kinds = {reason_kind(x) for x in r["blocked_reasons"]} if "blocked_reasons" in r else set(r.get("reasons", {}))
        reasons.update(kinds)
    if reasons:
        lines += ["", "## Why groups are unprunable (number of models)", ""]
        lines += [f"- {k}: {n}" for k, n in reasons.most_common()]
    lines += ["", "## Not taken (yet), and why", "",
              "- LayerNorm / GroupNorm / GRN over the channels (ConvNeXt, ConvNeXt-V2, most hybrids): the statistics",
              "  change with the kept set, so the masked and the sliced model differ by construction; those groups stay",
              "  unprunable.",
              "- Grouped convs with a != b and a != 1 channels per conv group in and out: pruning inside conv groups",
              "  needs per-group input slicing.",
              "- Channel selection `x[:, :k]` / `chunk` (GhostNet, FasterNet partial convs, ShuffleNet-V2 halves and",
              "  its channel shuffle): exact only if the parts keep the same count with interleaved positions, a",
              "  constraint between groups that a Plan cannot express yet.",
              "- Functional convs / linears on `get_attr` parameters (`F.conv2d(x, self.w)`), weight-standardised",
              "  convs (timm StdConv2d / ScaledStdConv2d: standardisation over the input channels changes with the kept",
              "  set): counted exactly, channels unprunable.",
              "- A channel count used as a value (`y * y.size(1) ** -0.5`): the group is unprunable with a reason naming",
              "  both nodes (a pruned model would compute with the new count)."]
    versions = next((r["versions"] for r in rows.values() if "versions" in r), {})
    commits = Counter(r.get("versions", {}).get("curlprune_commit", "?") for r in rows.values())
    lines += ["", "Measured with " + ", ".join(f"{k} {v}" for k, v in versions.items() if v and k != "curlprune_commit")
              + ", 1 thread; curlprune commit " + ", ".join(f"{c} ({n} models)" for c, n in commits.most_common()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("sweep", help="measure every model without a result yet (resumable)")
    p.add_argument("--only", default="", help="torchvision, timm, or comma-separated names (torchvision:resnet18,timm:dla34)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per model")
    p.add_argument("--redo", action="store_true", help="measure again models that have a result")
    p.add_argument("--retry", action="store_true", help="measure again models that timed out, crashed or were killed")
    p = sub.add_parser("render", help="write docs/coverage.md from the results")
    p.add_argument("--out", default="-", help="file to write (- for stdout)")
    p = sub.add_parser("one", help="measure one model (internal)")
    p.add_argument("name")
    p.add_argument("out")
    p.add_argument("commit", nargs="?", default="?")
    args = parser.parse_args(argv)
    if args.command == "one":
        return one(args.name, Path(args.out), args.commit)
    if args.command == "sweep":
        names = all_names()
        if args.only in ("torchvision", "timm"):
            names = [n for n in names if n.startswith(args.only + ":")]
        elif args.only:
            names = args.only.split(",")
        return sweep(names, args.timeout, args.redo, args.retry)
    text = render()
    if getattr(args, "out", "-") == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
