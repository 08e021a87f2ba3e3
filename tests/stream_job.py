"""A tiny fine-tuning of cifar:resnet20 on an ImageFolder read in memory or streamed, that tests
start under torchrun (2 gloo processes); every rank writes its final weights.

    torchrun --standalone --nproc_per_node=2 tests/stream_job.py DATA RUN_DIR --streaming true|false
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from curlprune.data.streaming import DataSettings, open_splits
from curlprune.models import build, input_spec
from curlprune.recover import FinetuneConfig, finetune
from curlprune.recover.dist import shutdown

MODEL = "cifar:resnet20"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--streaming", choices=("true", "false"), required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = open_splits(args.data, settings=DataSettings.of(args.streaming, None, 1))
    torch.manual_seed(0)
    model = build(MODEL, num_classes=len(data["train"].classes))
    cfg = FinetuneConfig(epochs=2, batch_size=8, lr=0.05, warmup_epochs=0.5, seed=3, progress=False, device="cpu", channels_last=False)
    finetune(model, data, input_spec(MODEL), cfg, args.run_dir)
    weights = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(weights, str(args.run_dir / f"rank{os.environ.get('RANK', '0')}.safetensors"))
    shutdown()


if __name__ == "__main__":
    main()
