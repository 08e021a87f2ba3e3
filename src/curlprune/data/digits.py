"""The demo's model: ``small:resnet-digits`` trained on scikit-learn's 8x8 digits in seconds.

Lives above both the model registry and the data module (it needs both), so that ``models/``
does not import ``data``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from curlprune.data.data import batches, load_digits_dataset
from curlprune.models import input_spec
from curlprune.models.cifar import SmallResNet
from curlprune.models.small import digits_resnet

def train_digits_model(seed: int = 0, epochs: int = 12, batch_size: int = 64) -> SmallResNet:
    """Train ``small:resnet-digits`` on the digits train split (seeded; a few seconds on a CPU).

    A minimal recipe for demos and tests: AdamW with a one-cycle schedule, pad-1 random crops.
    Evaluate the result with ``curlprune.data.data.evaluate`` on ``load_digits_dataset(seed)["test"]``.

    Args:
        seed: seeds the split, the initial weights, the batch order and the crops.
        epochs: passes over the train split.
        batch_size: images per step.

    Returns:
        The trained model, in eval mode.
    """
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
