"""Where the benchmarks find the repository, the shared data and weights, and where they write results.

One table for every script in ``benchmarks/`` (the shared folder is ``../shared`` next to the
repository unless ``CURLPRUNE_SHARED`` names another). Nothing here is downloaded: a script that
needs a missing file says so and stops.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CURLPRUNE_SHARED", ROOT.parent / "shared"))
RESULTS = ROOT / "benchmarks" / "results"

CIFAR10_PNG = SHARED / "data" / "cifar10-png.zip"  # lossless CIFAR-10, the domain of the akamaster checkpoints
CIFAR10_JPEG = SHARED / "data" / "cifar10-jpeg.zip"
CLOTHING10 = SHARED / "data" / "clothing10-96.zip"  # clothing10 at 96 px (the small-data benchmarks)
RESNET56 = SHARED / "models" / "resnet56-4bfd9763.th"  # akamaster/pytorch_resnet_cifar10 (He et al. 2016, option-A shortcuts)
RESNET20 = SHARED / "models" / "resnet20-12fca82f.th"
RESNET56_JPEG = SHARED / "models" / "resnet56-cifar10jpeg.pt"  # the same networks fine-tuned on the JPEG copy
RESNET20_JPEG = SHARED / "models" / "resnet20-cifar10jpeg.pt"
