"""Named recipes: presets of the recovery stages' settings, one table (``recipe:`` in a run config).

    paper   the CURL authors' constants (Luo & Wu, CVPR 2020; their public scripts, Roll920/CURL;
            docs/method.md §5, §7, §8 and /work/shared/docs/curl-method.md "Stage 2/3 training"):
            distill: 150 epochs (their CUB ResNet-50; 200 for MobileNetV2), batch 32, lr 0.01,
                     5 warm-up epochs, T = 2, alpha = 0.7, mixup Beta(1, 1), no extra CE, no features;
            refine:  16 epochs, batch 32, lr 1e-4, no warm-up, T = 1, alpha = 0.7, label step 1 at
                     batch 32, the 6x expanded set, BN in train mode (``bn: update``, as the authors).

A recipe gives a stage's settings their values before the section's own keys, which win: ``recipe:
paper`` with ``distill: {epochs: 30}`` is the paper's distillation for 30 epochs. Without a recipe
every setting has its dataclass default (docs/method.md §8). The values are spelt out here, not
read from the defaults, so the preset stays the paper's when a default is changed by measurement
(as ``ce_weight`` was: 0.5 by default since issue 19, 0 here).

A recipe also gives the stage list of a config that lists none (:func:`recipe_stages`): prune, then
the stages it sets, in the table's order. ``recipe: paper`` alone is ``stages: [prune, distill,
refine]``, the paper's two recovery stages, while the default stage list without a recipe is
``[prune, distill]`` (docs/method.md §8); a config's own ``stages`` always wins.
"""
from __future__ import annotations

from typing import Any

from curlprune.errors import CurlpruneError
from curlprune.store.rundir import PRUNE_STAGE

RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {
        "distill": {"epochs": 150, "batch_size": 32, "lr": 0.01, "warmup_epochs": 5.0, "momentum": 0.9, "weight_decay": 4e-5,
                    "temperature": 2.0, "alpha": 0.7, "mixup_alpha": 1.0, "ce_weight": 0.0, "feature_weight": None,
                    "features": None, "early_stop": None},
        "refine": {"epochs": 16, "batch_size": 32, "lr": 1e-4, "warmup_epochs": 0.0, "momentum": 0.9, "weight_decay": 4e-5,
                   "temperature": 1.0, "alpha": 0.7, "label_lr": 1.0, "label_reference_batch": 32, "expand": True, "bn": "update"},
    },
}
"""Recipe name -> stage name -> setting -> value (the stages in the order they run)."""


def recipe_settings(recipe: str | None, stage: str, where: str = "config") -> dict[str, Any]:
    """The settings ``recipe`` gives ``stage`` (empty for no recipe or a stage it does not set).

    Args:
        recipe: a name in :data:`RECIPES`, or None.
        stage: a stage name (``distill``, ``refine``, ...).
        where: names the source in the message.
    Raises:
        CurlpruneError: an unknown recipe (the message lists the known ones).
    """
    if recipe is None:
        return {}
    if recipe not in RECIPES:
        raise CurlpruneError(f"{where}: unknown recipe {recipe!r}: use one of {', '.join(RECIPES)} (or leave recipe out for the defaults)")
    return dict(RECIPES[recipe].get(stage, {}))


def recipe_stages(recipe: str | None) -> list[str] | None:
    """The stage list of a config that names ``recipe`` and lists no ``stages``: ``prune``, then the
    stages the recipe sets, in :data:`RECIPES` order (``paper``: ``[prune, distill, refine]``); None
    for no recipe (the run's default stage list applies). ``recipe`` must be known
    (:func:`recipe_settings` checks it first).
    """
    return None if recipe is None else [PRUNE_STAGE, *RECIPES[recipe]]
