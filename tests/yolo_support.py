"""A YOLOv8 detector written from its published definition, for the coverage tests (test_yolo.py).

``ultralytics`` (AGPL) is not a dependency: its install pulls opencv-python (79 MB) and polars
(54 MB) into every CI run, so the tests model its blocks here instead, written from the published
definitions (ultralytics ``cfg/models/v8/yolov8.yaml`` and ``nn/modules`` ``conv.py``, ``block.py``,
``head.py``; ``nn/tasks.py`` for the scaling rules):

* ``Conv``: conv (no bias, "same" padding) -> BatchNorm -> SiLU;
* ``Bottleneck``: two 3x3 ``Conv`` with a residual add when the widths agree;
* ``C2f``: ``list(cv1(x).chunk(2, 1))`` (or ``forward_split``'s ``split((c, c), 1)``), each
  bottleneck on the last part, ``torch.cat`` of all parts, ``cv2``;
* ``SPPF``: ``cv1``, three chained 5x5 max pools, ``torch.cat`` of the four, ``cv2``;
* the FPN/PAN neck: ``nn.Upsample`` + ``Concat`` with backbone levels, strided ``Conv`` + ``Concat``;
* ``Detect`` (v8, "legacy" class branch): per level a box branch (``4 * reg_max`` channels) and a
  class branch (``nc`` channels) concatenated; in eval mode the levels are flattened and cut with
  ``split((4 * reg_max, nc), 1)``, the box distributions reduced by ``DFL`` (a fixed 1x1 conv over a
  softmax) and decoded around anchors, and ``(decoded [N, 4 + nc, A], per-level list)`` returned.

The layers are built from the yaml's table with its width / depth scaling (``make_divisible(min(c,
max_channels) * width, 8)``, ``max(round(n * depth), 1)`` repeats), so the parameter counts match the
published ones (YOLOv8n: 3,157,200; YOLOv8s: 11,166,560) and the module names ``model.<i>...`` match
ultralytics' state_dict keys. One departure: ultralytics caches the anchors between calls behind
``if self.dynamic or self.shape != shape`` (Python control flow on a shape, which torch.fx cannot
trace); here they are computed on every call, as ultralytics does with ``Detect.dynamic = True``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

SCALES = {"n": (0.33, 0.25, 1024), "s": (0.33, 0.50, 1024), "m": (0.67, 0.75, 768)}  # depth, width, max channels

# yolov8.yaml: (from, repeats, module, args)
BACKBONE = [
    (-1, 1, "Conv", [64, 3, 2]),  # 0-P1/2
    (-1, 1, "Conv", [128, 3, 2]),  # 1-P2/4
    (-1, 3, "C2f", [128, True]),
    (-1, 1, "Conv", [256, 3, 2]),  # 3-P3/8
    (-1, 6, "C2f", [256, True]),
    (-1, 1, "Conv", [512, 3, 2]),  # 5-P4/16
    (-1, 6, "C2f", [512, True]),
    (-1, 1, "Conv", [1024, 3, 2]),  # 7-P5/32
    (-1, 3, "C2f", [1024, True]),
    (-1, 1, "SPPF", [1024, 5]),  # 9
]
HEAD = [
    (-1, 1, "Upsample", [None, 2, "nearest"]),
    ([-1, 6], 1, "Concat", [1]),  # cat backbone P4
    (-1, 3, "C2f", [512]),  # 12
    (-1, 1, "Upsample", [None, 2, "nearest"]),
    ([-1, 4], 1, "Concat", [1]),  # cat backbone P3
    (-1, 3, "C2f", [256]),  # 15 (P3/8-small)
    (-1, 1, "Conv", [256, 3, 2]),
    ([-1, 12], 1, "Concat", [1]),  # cat head P4
    (-1, 3, "C2f", [512]),  # 18 (P4/16-medium)
    (-1, 1, "Conv", [512, 3, 2]),
    ([-1, 9], 1, "Concat", [1]),  # cat head P5
    (-1, 3, "C2f", [1024]),  # 21 (P5/32-large)
    ([15, 18, 21], 1, "Detect", ["nc"]),  # Detect(P3, P4, P5)
]
STRIDES = (8.0, 16.0, 32.0)


class Conv(nn.Module):
    """conv (no bias, padding k // 2) -> BatchNorm -> SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, g: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two 3x3 Convs, plus the input when ``shortcut`` and the widths agree."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, e: float = 1.0) -> None:
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 3)
        self.cv2 = Conv(hidden, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP bottleneck with two convs: cv1's output cut in two, ``n`` bottlenecks chained on the last
    part, every part concatenated, cv2. ``split_form``: ultralytics' ``forward_split``."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, e: float = 0.5, split_form: bool = False) -> None:
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut) for _ in range(n))
        self.split_form = split_form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split_form:
            parts = self.cv1(x).split((self.c, self.c), 1)
            y = [parts[0], parts[1]]
        else:
            y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: cv1, three chained max pools, cat of the four, cv2."""

    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        hidden = c1 // 2
        self.cv1 = Conv(c1, hidden, 1)
        self.cv2 = Conv(hidden * 4, c2, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class Concat(nn.Module):
    def __init__(self, dimension: int = 1) -> None:
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)


class DFL(nn.Module):
    """Distribution focal loss integral: the expected bin of a softmax over ``c1`` bins (a fixed 1x1 conv)."""

    def __init__(self, c1: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1))
        self.c1 = c1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


def make_anchors(feats: list[torch.Tensor], strides: tuple[float, ...], offset: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor centres ``[A, 2]`` (cells, x then y) and their strides ``[A, 1]`` of every level."""
    points, stride_tensor = [], []
    dtype, device = feats[0].dtype, feats[0].device
    for i, stride in enumerate(strides):
        _, _, h, w = feats[i].shape
        sx = torch.arange(end=w, device=device, dtype=dtype) + offset
        sy = torch.arange(end=h, device=device, dtype=dtype) + offset
        sy, sx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((sx, sy), -1).view(-1, 2))
        stride_tensor.append(torch.full((h * w, 1), stride, dtype=dtype, device=device))
    return torch.cat(points), torch.cat(stride_tensor)


def dist2bbox(distance: torch.Tensor, anchors: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Distances (left-top, right-bottom) from the anchors -> boxes (centre xy, wh)."""
    lt, rb = distance.chunk(2, dim)
    x1y1, x2y2 = anchors - lt, anchors + rb
    return torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), dim)


class Detect(nn.Module):
    """YOLOv8 detection head (the v8 class branch: two 3x3 Convs and a 1x1 conv per level)."""

    def __init__(self, nc: int = 80, ch: tuple[int, ...] = (), reg_max: int = 16) -> None:
        super().__init__()
        self.nc, self.nl, self.reg_max = nc, len(ch), reg_max
        self.no = nc + 4 * reg_max
        self.stride = STRIDES[: self.nl]
        c2, c3 = max(16, ch[0] // 4, 4 * reg_max), max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1)) for x in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for x in ch)
        self.dfl = DFL(reg_max)

    def forward(self, x: list[torch.Tensor]):
        x = [torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])), 1) for i in range(self.nl)]
        if self.training:
            return x
        shape = x[0].shape
        x_cat = torch.cat([xi.view(shape[0], self.no, -1) for xi in x], 2)
        anchors, strides = (a.transpose(0, 1) for a in make_anchors(x, self.stride, 0.5))
        box, cls = x_cat.split((4 * self.reg_max, self.nc), 1)
        dbox = dist2bbox(self.dfl(box), anchors.unsqueeze(0), dim=1) * strides
        return torch.cat((dbox, cls.sigmoid()), 1), x


def make_divisible(x: float, divisor: int = 8) -> int:
    return math.ceil(x / divisor) * divisor


class DetectionModel(nn.Module):
    """YOLOv8 ``scale`` ("n", "s", "m") built from the yaml's table, run as ultralytics' ``_predict_once``."""

    def __init__(self, scale: str = "n", nc: int = 80, split_form: bool = False) -> None:
        super().__init__()
        depth, width, max_channels = SCALES[scale]
        ch, layers, save = [3], [], set()
        for i, (f, n, kind, args) in enumerate(BACKBONE + HEAD):
            n = max(round(n * depth), 1) if n > 1 else n
            if kind in ("Conv", "C2f", "SPPF"):
                c1, c2 = ch[f], make_divisible(min(args[0], max_channels) * width, 8)
                if kind == "Conv":
                    m = Conv(c1, c2, *args[1:])
                elif kind == "C2f":
                    m = C2f(c1, c2, n, *args[1:], split_form=split_form)
                else:
                    m = SPPF(c1, c2, *args[1:])
            elif kind == "Upsample":
                m, c2 = nn.Upsample(*args), ch[f]
            elif kind == "Concat":
                m, c2 = Concat(*args), sum(ch[j] for j in f)
            else:
                m, c2 = Detect(nc, tuple(ch[j] for j in f)), None
            m.f, m.i = f, i
            save.update(j % i for j in ([f] if isinstance(f, int) else f) if j != -1)
            layers.append(m)
            ch = ch[1:] if i == 0 else ch
            ch.append(c2)
        self.model = nn.Sequential(*layers)
        self.save = sorted(save)

    def forward(self, x: torch.Tensor):
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x
