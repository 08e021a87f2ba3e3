"""Issue 23: YOLOv8 (C2f, SPPF, an FPN/PAN neck, a Detect head with several outputs) and the channel
split by an int size, ``list(x.split(k, 1))``.

1. ``split(k, dim)`` with an int ``k`` cuts the channels in parts of ``k`` (the last one possibly
   shorter); the number of parts depends on the input's shape, so iterating them is traced by
   running the graph traced so far on the example input. Each part is its own channel range, and
   ``apply`` rewrites the call as a split by the kept sizes, so the pruned model cuts exactly where
   the masked one does.
2. YOLOv8n from its published definition (tests/yolo_support.py: ``ultralytics`` itself is not
   installed, its dependencies being too large for CI): traced, pruned, masked == sliced on every
   output, ``plan_cost == count``; the C2f parts and bottlenecks prunable; the head's box and class
   channels fixed; KL-type criteria refused in one line, ``l1`` prunes it.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_equivalence import relative_error
from test_faults import check_invariants, randomise
from torch import nn
from yolo_support import DetectionModel

import curlprune
from curlprune.cost.analysis import model_cost_fn, plan_cost, trace
from curlprune.cost.cost import count
from curlprune.criteria import compute_scores
from curlprune.errors import CurlpruneError
from curlprune.graph import symbolic_trace
from curlprune.select.search import Target, select
from curlprune.surgery.inference import optimize_for_inference
from curlprune.surgery.keep_class import slice_model
from curlprune.surgery.surgery import apply, mask


def by_name(groups):
    return {g.name: g for g in groups}


def part_groups(groups):
    return [g for g in groups if any(m.role.startswith("part") for m in g.node_members)]


# ----------------------------------------------------------------------------------------------
# 1. split by an int size along the channel dim


class IntSplit(nn.Module):
    """conv(3->16) -> BN -> SiLU -> split by an int size along dim 1 -> one conv per part -> cat -> conv(->2).

    ``form``: ``list`` (``list(y.split(k, 1))``), ``function`` (``list(torch.split(y, k, dim=1))``)
    ``unpacked`` (``a, b, c = y.split(k, 1)``) or ``indexed`` (``y.split(k, dim=1)[i]``, no iteration)."""

    def __init__(self, form: str, k: int) -> None:
        super().__init__()
        self.form, self.k = form, k
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        sizes = [min(k, 16 - s) for s in range(0, 16, k)]
        self.parts = nn.ModuleList(nn.Conv2d(c, 4, 3, padding=1) for c in sizes)
        self.head = nn.Conv2d(4 * len(sizes), 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.bn(self.a(x)))
        if self.form == "list":
            parts = list(y.split(self.k, 1))
        elif self.form == "function":
            parts = list(torch.split(y, self.k, dim=1))
        elif self.form == "unpacked":
            a, b, c = y.split(self.k, 1)
            parts = [a, b, c]
        else:
            cut = y.split(self.k, dim=1)
            parts = [cut[i] for i in range(len(self.parts))]
        return self.head(torch.cat([conv(p) for conv, p in zip(self.parts, parts)], 1))


class IntSplitC2f(nn.Module):
    """YOLOv8's C2f written with an int split: ``list(cv1(x).split(c, 1))``, a bottleneck on the
    last part, the cat of all parts, cv2."""

    def __init__(self) -> None:
        super().__init__()
        self.k = 8
        self.cv1 = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.SiLU())
        self.m = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU())
        self.cv2 = nn.Conv2d(24, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).split(self.k, 1))
        y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


FORMS = {
    "list-uneven": lambda: IntSplit("list", 6),  # 16 channels in parts of 6, 6, 4
    "list-even": lambda: IntSplit("list", 8),
    "function-uneven": lambda: IntSplit("function", 5),  # 5, 5, 5, 1
    "indexed-uneven": lambda: IntSplit("indexed", 6),
    "unpacked-uneven": lambda: IntSplit("unpacked", 6),
    "c2f": IntSplitC2f,
}


@pytest.mark.parametrize("form", list(FORMS))
def test_int_split_parts_are_pruned_as_their_own_ranges(form):
    model = randomise(FORMS[form]())
    x = torch.randn(2, 3, 8, 8)
    groups = trace(model, x)
    parts = part_groups(groups)
    k = model.k
    want = [min(k, 16 - s) for s in range(0, 16, k)]
    assert [g.width for g in parts] == want and all(g.prunable for g in parts), [(g.name, g.width, g.reason) for g in groups]
    check_invariants(model, x, groups, plans=5)
    plan = {g.name: list(range(1, g.width)) if g.width > 1 else [0] for g in parts}  # one channel less per part
    small = apply(model, groups, plan)
    producer = small.get_submodule("cv1.0" if form == "c2f" else "a")
    assert producer.out_channels == sum(len(kept) for kept in plan.values())
    (node,) = [n for n in small.graph.nodes if n.target is torch.split]
    assert node.args[1] == tuple(len(plan[g.name]) for g in parts)  # the cut moved with the kept channels
    with torch.no_grad():
        with mask(model, groups, plan):
            masked = model(x)
        assert relative_error(small(x), masked) < 1e-5


def test_apply_to_an_untraced_copy_takes_the_part_count_from_the_groups():
    model = randomise(IntSplit("list", 6))
    x = torch.randn(1, 3, 8, 8)
    groups = trace(model, x)
    fresh = copy.deepcopy(model)  # never traced: the number of parts comes from the groups' members
    plan = {g.name: [0, 2] for g in part_groups(groups)}
    small = apply(fresh, groups, plan)
    with torch.no_grad():
        with mask(model, groups, plan):
            masked = model(x)
        assert relative_error(small(x), masked) < 1e-5
    assert plan_cost(model, x, groups, plan) == count(small, x)


class SpatialIntSplit(nn.Module):
    """conv(3->8) -> ``list(y.split(3, dim=2))`` (rows in bands of 3) -> each band scaled -> cat on dim 2 -> conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bands = list(self.a(x).split(3, dim=2))
        return self.b(torch.cat([band * (i + 1) for i, band in enumerate(bands)], 2))


def test_int_split_along_a_spatial_dim_keeps_the_channels():
    model = randomise(SpatialIntSplit())
    x = torch.randn(2, 3, 8, 8)  # 8 rows: bands of 3, 3, 2
    groups = by_name(trace(model, x))
    assert groups["a"].prunable, [(g.name, g.reason) for g in groups.values()]
    check_invariants(model, x, list(groups.values()), plans=3)


def test_iterated_int_split_without_an_example_input_is_one_line():
    with pytest.raises(CurlpruneError) as err:
        symbolic_trace(IntSplit("list", 6))
    message = str(err.value)
    assert "\n" not in message and message.startswith("cannot trace IntSplit: the parts of split")
    assert "split by an int size" in message and "example input" in message
    gm = symbolic_trace(IntSplit("list", 6), (torch.randn(1, 3, 8, 8),))  # with one it traces
    assert sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "getitem") == 3


def test_inference_copy_of_an_iterated_int_split_traces_with_its_example_input():
    model = randomise(IntSplit("list", 6))
    x = torch.randn(2, 3, 8, 8)
    fast = optimize_for_inference(model, x)
    with torch.no_grad():
        assert relative_error(fast(x), model(x)) < 1e-5
    small = apply(model, trace(model, x), {})  # a pruned model is its graph: traced as it is, no input needed
    assert isinstance(optimize_for_inference(small), torch.fx.GraphModule)


def test_unpacked_int_split_traces_without_an_example_input():
    """``a, b, c = y.split(k, 1)`` says how many parts it takes (as torch.fx's own unpacking)."""
    gm = symbolic_trace(IntSplit("unpacked", 6))
    assert sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "getitem") == 3


@pytest.mark.parametrize("criterion", ["kl", "kl-approx"])
def test_kl_scores_a_classifier_with_an_iterated_int_split(criterion):
    """The KL criteria trace their own copy of the model: it gets the calibration batch's shape."""

    class Classifier(IntSplit):
        def __init__(self) -> None:
            super().__init__("list", 6)
            self.fc = nn.Linear(2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(super().forward(x).mean((2, 3)))

    model = randomise(Classifier())
    x = torch.randn(4, 3, 8, 8)
    groups = trace(model, x)
    scores = compute_scores(criterion, model, groups, images=x)
    assert {g.name for g in part_groups(groups)} <= set(scores)
    assert all(scores[g.name].shape == (g.width,) for g in part_groups(groups))


# ----------------------------------------------------------------------------------------------
# 2. YOLOv8

C2F_BLOCKS = (2, 4, 6, 8, 12, 15, 18, 21)  # yolov8.yaml's C2f layers
X = (1, 3, 64, 64)  # levels P3, P4, P5 at 8x8, 4x4, 2x2


@pytest.fixture(scope="module")
def yolo():
    torch.manual_seed(0)
    model = randomise(DetectionModel("n"))
    x = torch.randn(X, generator=torch.Generator().manual_seed(1))
    return model, x, trace(model, x)


def test_the_model_is_yolov8_by_its_published_parameter_counts():
    """yolov8.yaml's summaries: YOLOv8n 3,157,200 parameters, YOLOv8s 11,166,560 (with the 16 fixed
    weights of the DFL conv, which the gradient counts leave out)."""
    for scale, params in (("n", 3_157_200), ("s", 11_166_560)):
        model = DetectionModel(scale)
        assert sum(p.numel() for p in model.parameters()) == params
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == params - 16


def test_yolov8n_c2f_channels_are_prunable_and_the_head_outputs_fixed(yolo):
    model, x, groups = yolo
    named = by_name(groups)
    for i in C2F_BLOCKS:
        block = model.model[i]
        first, second = named[f"model.{i}.cv1.conv"], named[f"model.{i}.cv1.conv#2"]  # chunk(2, 1)'s parts
        assert first.prunable and second.prunable and first.width == second.width == block.c
        for j in range(len(block.m)):
            assert named[f"model.{i}.m.{j}.cv1.conv"].prunable
        assert named[f"model.{i}.cv2.conv"].prunable
    assert named["model.9.cv1.conv"].prunable and named["model.9.cv2.conv"].prunable  # SPPF
    for level in range(3):  # the box (4 * reg_max) and class (nc) channels of each level stay
        box, cls = named[f"model.22.cv2.{level}.2"], named[f"model.22.cv3.{level}.2"]
        assert (box.width, cls.width) == (64, 80) and not box.prunable and not cls.prunable
        assert named[f"model.22.cv2.{level}.0.conv"].prunable and named[f"model.22.cv3.{level}.1.conv"].prunable
    # every channel group a conv makes is prunable but the six head outputs: 59 of 65 groups, 4,960 of
    # 5,392 channels (the rest of the 81 groups: the input and index tensors of the anchor grid)
    modules = dict(model.named_modules())
    convs = [g for g in groups if g.name.split("#")[0] in modules]
    heads = {f"model.22.{branch}.{level}.2" for branch in ("cv2", "cv3") for level in range(3)}
    assert {g.name for g in groups if g.prunable} == {g.name for g in convs} - heads
    assert sum(g.width for g in convs if g.name not in heads) == sum(g.width for g in groups if g.prunable)


def test_yolov8n_masked_equals_sliced_on_every_output(yolo):
    model, x, groups = yolo
    check_invariants(model, x, groups, plans=2, seed="yolov8n")


def test_yolov8n_pruned_by_l1_to_70_percent_of_its_macs(yolo):
    model, x, groups = yolo
    scores = compute_scores("l1", model, groups)
    selection = select(groups, scores, model_cost_fn(model, x, groups), Target.parse("macs", 0.7), floor=0.3)
    plan = selection.plan
    assert any(len(plan.get(f"model.{i}.cv1.conv", range(10**6))) < model.model[i].c for i in C2F_BLOCKS)
    small = apply(model, groups, plan)
    with torch.no_grad():
        full, pruned = model(x), small(x)
        with mask(model, groups, plan):
            masked = model(x)
    assert pruned[0].shape == full[0].shape == (1, 84, 84)  # 4 box + 80 class rows, 64 + 16 + 4 anchors
    assert [t.shape for t in pruned[1]] == [t.shape for t in full[1]]  # 144 = 64 box + 80 class channels
    assert relative_error(pruned, masked) < 1e-5
    macs, params = count(small, x)
    assert (macs, params) == plan_cost(model, x, groups, plan)
    assert macs <= 0.7 * count(model, x)[0]


@pytest.mark.parametrize("criterion", ["kl", "kl-approx", "taylor"])
def test_output_criteria_on_yolov8_are_refused_naming_the_weight_criteria(yolo, criterion):
    model, x, groups = yolo
    with pytest.raises(CurlpruneError) as err:
        compute_scores(criterion, model, groups, images=x, labels=torch.zeros(1, dtype=torch.long))
    message = str(err.value)
    assert "\n" not in message and "returns a tuple of 2 outputs" in message
    working = message.split(": ")[-1].split(", ")
    assert {"l1", "bn", "random"} <= set(working) and not {"kl", "kl-approx", "taylor"} & set(working)
    for name in working:  # and each of those scores every prunable group
        assert set(compute_scores(name, model, groups, images=x)) == {g.name for g in groups if g.prunable}


def test_yolov8n_with_c2f_forward_split_is_pruned_the_same_way():
    """C2f's ``forward_split``: ``cv1(x).split((c, c), 1)`` indexed into a list."""
    model = randomise(DetectionModel("n", split_form=True))
    x = torch.randn(X)
    groups = trace(model, x)
    assert [g.name for g in groups if g.prunable] == [g.name for g in trace(randomise(DetectionModel("n")), x) if g.prunable]
    check_invariants(model, x, groups, plans=1, seed="yolov8n-split")


def test_yolov8n_keeps_its_class_where_the_c2f_parts_shrink_equally(yolo):
    """The user's C2f forward cuts ``chunk(2, 1)`` of whatever width it gets: right when both parts
    keep as many channels (the class is kept, proven equal to the graph), wrong otherwise (the
    GraphModule, with the reason naming the split)."""
    model, x, groups = yolo
    even = {"model.4.cv1.conv": [0, *range(3, 32)], "model.4.cv1.conv#2": [*range(0, 29), 31]}  # 30 and 30
    sliced = slice_model(model, groups, even, example_input=x)
    assert sliced.kept and isinstance(sliced.model, DetectionModel), sliced.reason
    assert sliced.model.model[4].m[0].cv1.conv.in_channels == 30
    uneven = {"model.4.cv1.conv": list(range(30)), "model.4.cv1.conv#2": list(range(31))}
    sliced = slice_model(model, groups, uneven, example_input=x)
    assert not sliced.kept and "parts of [32, 32]" in sliced.reason and "keeps [30, 31]" in sliced.reason
    with torch.no_grad():
        with mask(model, groups, uneven):
            masked = model(x)
        assert relative_error(sliced.model(x), masked) < 1e-5


def test_curlprune_prune_takes_yolov8n_with_l1_and_refuses_the_default_kl_in_one_line(yolo):
    """The one-call API: ``criterion="l1"`` needs no data; the default ``kl`` with data is refused
    before any scoring, naming the criteria that work."""
    model, x, _ = yolo
    pruned = curlprune.prune(model, torch.zeros(X), criterion="l1", target_macs=0.7)
    assert pruned.report.selection["macs_ratio"] <= 0.7
    with torch.no_grad():
        out, full = pruned.model(x), model(x)
    assert out[0].shape == full[0].shape and [t.shape for t in out[1]] == [t.shape for t in full[1]]
    with pytest.raises(CurlpruneError, match=r"returns a tuple of 2 outputs .*: l1, bn, random$"):
        curlprune.prune(model, torch.zeros(X), data=torch.randn(4, *X[1:]), calib=4, target_macs=0.7)
