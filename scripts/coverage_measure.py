"""One model of the coverage sweep: the model list, building a model with random weights, its input,
and curlprune's measurement (trace, masked == sliced, plan_cost == count, prunable share).

Names: ``torchvision:<arch>`` (classification), ``timm:<arch>``, ``segmentation:<arch>`` (torchvision's
segmentation models whole) and ``detection:<arch>.backbone`` (a torchvision detector's
``model.backbone``, with its FPN where it has one). Every model is built without weights
(``weights=None, weights_backbone=None``).
"""
from __future__ import annotations

import copy
import random
import re
import time
from collections import Counter

import torch
import torchvision
from torch import nn
from torch.utils import _pytree as pytree

from curlprune.cost.analysis import plan_cost, trace
from curlprune.cost.cost import count
from curlprune.models.timm_family import build as build_timm
from curlprune.surgery.surgery import apply, mask, random_plan

TOLERANCE = 1e-4  # float32 relative difference for masked vs sliced
TOLERANCE_F64 = 1e-8  # the same in float64: anything above is a real difference, not round-off
SIZES = (32, 64, 96, 128, 160, 192, 224, 240, 256, 288, 299, 320, 331, 384)
IO_REASONS = {"model input", "feeds the model output"}
SOURCES = {"torchvision": "torchvision", "timm": "timm", "segmentation": "dense prediction",
           "detection": "dense prediction"}

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
# the detectors whose backbone (with its FPN) is swept: Faster R-CNN (ResNet-50 and MobileNet-V3 FPN
# variants), RetinaNet, FCOS, SSDlite. Mask / Keypoint R-CNN share Faster R-CNN's backbone.
DETECTORS = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
             "fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2",
             "fcos_resnet50_fpn", "ssdlite320_mobilenet_v3_large")


def all_names() -> list[str]:
    """Every model of the sweep in measuring order: light torchvision classifiers, timm (TIMM_MODELS),
    dense prediction (torchvision segmentation, detector backbones), heavy torchvision classifiers."""
    tv = torchvision.models.list_models(module=torchvision.models)
    seg = torchvision.models.list_models(module=torchvision.models.segmentation)
    return ([f"torchvision:{a}" for a in tv if a not in HEAVY] + [f"timm:{a}" for _, _, a in TIMM_MODELS]
            + [f"segmentation:{a}" for a in seg] + [f"detection:{a}.backbone" for a in DETECTORS]
            + [f"torchvision:{a}" for a in tv if a in HEAVY])


def family_of(name: str) -> tuple[str, str]:
    """(family, kind) of a model name for the table; kind: cnn / hybrid / transformer / vit / dense."""
    prefix, _, arch = name.partition(":")
    if prefix == "timm":
        return next(((f, k) for f, k, a in TIMM_MODELS if a == arch), ("timm", "?"))
    if prefix in ("segmentation", "detection"):
        return prefix, "dense"
    return "torchvision", "vit" if arch.startswith(("vit_", "swin", "maxvit")) else "cnn"


def source_of(name: str) -> str:
    """The summary's source of a model name: torchvision, timm or dense prediction."""
    return SOURCES.get(name.partition(":")[0], "other")


def build_random(name: str, seed: int = 0) -> nn.Module:
    """The architecture of ``name`` in eval mode with random weights; BN statistics and every vector
    parameter (biases, layer scales, affine norms) randomised so that a wrongly handled channel cannot
    hide behind an init value of zeros or ones."""
    torch.manual_seed(seed)
    prefix, _, arch = name.partition(":")
    if prefix == "timm":
        model = build_timm(arch)
    elif prefix == "torchvision":
        model = torchvision.models.get_model(arch, weights=None)
    elif prefix == "segmentation":
        model = torchvision.models.get_model(arch, weights=None, weights_backbone=None)
    elif prefix == "detection":
        model = torchvision.models.get_model(arch.removesuffix(".backbone"), weights=None, weights_backbone=None).backbone
    else:
        raise ValueError(f"unknown model source in {name!r} (torchvision:, timm:, segmentation:, detection:)")
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
            if id(p) not in norms and p.numel() > 0 and p.numel() == max(p.shape, default=1):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def smallest_input(model: nn.Module) -> tuple[int, ...]:
    """The smallest square 3-channel input of SIZES the model runs on (batch 1)."""
    last = None
    for size in SIZES:
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, size, size))
            return (1, 3, size, size)
        except Exception as exc:  # noqa: BLE001 - any failure means "not this size"
            last = exc
    raise RuntimeError(f"no input size of {SIZES[0]}..{SIZES[-1]} works ({type(last).__name__}: {first_line(last)})")


def example_input(model: nn.Module) -> torch.Tensor:
    """The seeded random input both tools get (shape: :func:`smallest_input`)."""
    return torch.randn(smallest_input(model), generator=torch.Generator().manual_seed(2))


def reason_kind(reason: str) -> str:
    """A reason without the node/module names, for counting kinds of reasons across models."""
    text = reason.split(" at node ")[0].split(" at ")[0]
    text = re.sub(r"\b(?!torch\.|_operator\.|builtins\.)[A-Za-z_]\w*(?:\.\w+)+\b", "<module>", text)
    return re.sub(r"(?<![A-Za-z_])\d+", "N", text)


def relative(a, b) -> float:
    """Largest relative difference over the tensors of two outputs (a tensor, or a dict/tuple of them)."""
    left, right = pytree.tree_leaves(a), pytree.tree_leaves(b)
    if len(left) != len(right) or any(p.shape != q.shape for p, q in zip(left, right)):
        return float("inf")
    return max(float((p - q).abs().max() / q.abs().max().clamp_min(1e-30)) for p, q in zip(left, right))


def all_finite(out) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in pytree.tree_leaves(out))


def channel_counts(groups) -> dict:
    """Channel counts of the traced groups. ``channels_all``: the sum of the widths of every channel
    group (each group counted once, the model input and output groups included); ``channels_prunable``:
    the same over the prunable groups; ``share``: their quotient (0 for a model without groups)."""
    prunable = sum(g.width for g in groups if g.prunable)
    total = sum(g.width for g in groups)
    return {"channels_prunable": prunable, "channels_all": total, "share": prunable / total if total else 0.0}


def measure(name: str, row: dict) -> None:
    """Every number of one curlprune row, written into ``row`` as it goes (``row["stage"]`` says how
    far it got); exceptions propagate to the caller, which records them."""
    row["stage"] = "build"
    model = build_random(name)
    row["stage"] = "input"
    x = example_input(model)
    row["input"] = "x".join(map(str, x.shape))
    row["stage"] = "trace"
    start = time.perf_counter()
    groups = trace(model, x)
    row["trace_s"] = round(time.perf_counter() - start, 3)
    prunable = [g for g in groups if g.prunable]
    blocked = [g for g in groups if not g.prunable and g.reason not in IO_REASONS]
    row.update(
        groups=len(groups), prunable_groups=len(prunable), **channel_counts(groups),
        blocked_groups=len(blocked), blocked_channels=sum(g.width for g in blocked),
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
        row["finite"] = all_finite(full) and all_finite(masked)
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


def status_of(row: dict) -> str:
    """``ok`` (every group but the model input/output prunable), ``partly`` (some groups unprunable,
    with reasons), ``unprunable`` (no prunable group), ``error`` (a one-line CurlpruneError), ``crash``
    (any other exception), ``timeout``, ``killed``, or ``SILENTLY WRONG`` (masked != sliced, or
    plan_cost != count)."""
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
