"""A tiny residual CNN for the 8x8 scikit-learn digits: the demo model and test subject.

Stem conv 1->16, stage 1: two 16-channel BasicBlocks, stage 2: two 32-channel BasicBlocks
(stride 2, 1x1 conv + BN projection shortcut), global average pool, ``linear`` 32->10. It has
both kinds of residual streams a pruner must follow (identity and projection) and trains in
seconds on a CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from curlprune.models.cifar import SmallResNet

# Mean and std of all pixels of sklearn's digits scaled to [0, 1].
DIGITS_MEAN = (0.3053,)
DIGITS_STD = (0.3759,)


def digits_resnet(num_classes: int = 10) -> SmallResNet:
    """The ``small:resnet-digits`` architecture (random weights)."""
    return SmallResNet((16, 32), (2, 2), in_channels=1, num_classes=num_classes, shortcut="projection")


def train_digits_model(seed: int = 0, epochs: int = 12, batch_size: int = 64) -> SmallResNet:
    """Train ``small:resnet-digits`` on the digits train split (seeded; a few seconds on a CPU).

    A minimal recipe for demos and tests: AdamW with a one-cycle schedule, pad-1 random crops.
    Evaluate the result with ``curlprune.data.evaluate`` on ``load_digits_dataset(seed)["test"]``.
    """
    from curlprune.data import batches, load_digits_dataset
    from curlprune.models.registry import input_spec

    torch.manual_seed(seed)
    spec = input_spec("small:resnet-digits")
    train = load_digits_dataset(seed)["train"]
    model = digits_resnet(spec.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=5e-4)
    steps_per_epoch = -(-len(train) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for images, labels in batches(train, spec, batch_size, train=True, shuffle=True, generator=generator):
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()
