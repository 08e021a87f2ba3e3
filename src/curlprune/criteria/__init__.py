"""Channel-importance criteria: one float per channel of every prunable group; lower = less important.

Every criterion returns ``Scores``: ``{group name: float64 array of length group.width}`` for the
prunable groups. For groups whose channels go in units (grouped convs), every channel of a unit
gets the unit's score where the criterion is defined per unit (``kl``, ``kl-approx``, ``random``).

    kl         CURL: batch-mean KL(q_masked || p) when the unit is zeroed (exact, fast; kl.py)
    kl-approx  second-order (Fisher) expansion of the same KL from a few backward passes
    l1         L1 norm of the producing filters (data-free)
    bn         |gamma| of the group's batch norms (data-free)
    taylor     first-order Taylor |sum a * dL/da| with labels (Molchanov et al.)
    random     seeded uniform scores (a control)

:data:`CRITERIA` is the one table of criteria: each entry (:class:`Criterion`) holds its scoring
function, the data it needs, its options with their defaults, the progress it reports and whether
its scores share one scale (which decides its default allocation). The prune stage, its config and
scores fingerprint, the allocation defaults and the ``prune`` command all read it;
:func:`register_criterion` adds a user's own criterion.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from curlprune.channels import ChannelGroup
from curlprune.criteria.base import DEFAULT_BUDGET_MB, BlockShare, Criterion, Option, Progress, Scores, unit_count
from curlprune.criteria.kl import kl_scores
from curlprune.criteria.kl_approx import DEFAULT_CLASSES as DEFAULT_APPROX_CLASSES
from curlprune.criteria.kl_approx import kl_approx_scores
from curlprune.criteria.magnitude import bn_scores, l1_scores, random_scores
from curlprune.criteria.taylor import taylor_scores
from curlprune.errors import CurlpruneError
from curlprune.graph import eval_mode
from curlprune.models.spec import is_logits

__all__ = [
    "CRITERIA", "DEFAULT_APPROX_CLASSES", "DEFAULT_BUDGET_MB", "BlockShare", "Criterion", "Option", "Progress", "Scores",
    "compute_scores", "get", "gives_logits", "options_by_name", "register_criterion", "work_items",
]

CRITERIA: dict[str, Criterion] = {}
"""Every registered criterion by name, in registration order (the built-in ones first)."""


def register_criterion(criterion: Criterion, *, replace: bool = False) -> Criterion:
    """Add ``criterion`` to :data:`CRITERIA`: ``compute_scores``, ``PruneConfig``, the prune stage and
    the ``prune`` command then accept its name.

    Its options are set by the prune stage from the ``PruneConfig`` fields of the same names
    (``seed``, ``budget_mb``, ``approx_classes``); an option with no such field keeps its default
    there, and is given to :func:`compute_scores` by name.

    Args:
        criterion: the entry (see :class:`Criterion`). Its function's keywords must match what it
            declares: ``images`` when it needs data, ``labels`` when it needs labels, ``progress``
            when it has ``work``, one keyword per option (with the declared default, when the
            function has one), and no other keyword without a default.
        replace: allow replacing a registered criterion of the same name.

    Returns:
        ``criterion``.

    Raises:
        CurlpruneError: the name is taken (without ``replace``), an option is declared twice, an
            option name is declared by another criterion with another default, or the function's
            keywords do not match the declaration (``blocks`` when it declares ``per_block``).
    """
    if not isinstance(criterion.name, str) or not criterion.name:
        raise CurlpruneError(f"a criterion needs a non-empty name, got {criterion.name!r}")
    if criterion.name in CRITERIA and not replace:
        raise CurlpruneError(f"criterion {criterion.name!r} is already registered: pass replace=True to replace it")
    names = [option.name for option in criterion.options]
    if len(set(names)) != len(names):
        raise CurlpruneError(f"criterion {criterion.name!r} declares an option twice: {', '.join(names)}")
    for option in criterion.options:
        known = options_by_name(exclude=criterion.name).get(option.name)
        if known is not None and (known[0].default != option.default or known[0].shared != option.shared):
            raise CurlpruneError(f"criterion {criterion.name!r}: option {option.name!r} has default {option.default!r} "
                                 f"but {', '.join(known[1])} declare(s) {known[0].default!r}: one setting, one default")
    _check_function(criterion)
    CRITERIA[criterion.name] = criterion
    return criterion


def _check_function(criterion: Criterion) -> None:
    """Raise unless ``criterion.function``'s keywords match what the entry declares (see :func:`register_criterion`)."""
    try:
        params = dict(list(inspect.signature(criterion.function).parameters.items())[2:])  # after (model, groups)
    except (TypeError, ValueError):
        return  # no signature to read (a builtin): the declaration is trusted
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    given = [name for name, wanted in (("images", criterion.needs_data), ("labels", criterion.needs_labels),
                                        ("progress", criterion.reports_progress), ("blocks", criterion.per_block)) if wanted]
    given += [option.argument for option in criterion.options]
    missing = [name for name in given if name not in params and not takes_any]
    required = [name for name, p in params.items() if p.default is inspect.Parameter.empty and name not in given
                and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    if missing or required:
        raise CurlpruneError(f"criterion {criterion.name!r}: its function lacks the keyword(s) {missing} it is given, "
                             f"or needs {required}, which it is not given: declare needs_data, needs_labels, work "
                             f"and options to match (model, groups, images, labels, progress, options)")
    for option in criterion.options:
        p = params.get(option.argument)
        if p is not None and p.default is not inspect.Parameter.empty and p.default != option.default:
            raise CurlpruneError(f"criterion {criterion.name!r}: option {option.name!r} defaults to {option.default!r} "
                                 f"but its function's {option.argument!r} to {p.default!r}")


def options_by_name(exclude: str | None = None) -> dict[str, tuple[Option, list[str]]]:
    """Every option of the registered criteria, once: name -> (its declaration, the criteria declaring it).

    Args:
        exclude: a criterion name left out (the one being registered).

    Returns:
        In registration order; the declaration is the first criterion's (they agree on the default).
    """
    found: dict[str, tuple[Option, list[str]]] = {}
    for criterion in CRITERIA.values():
        if criterion.name == exclude:
            continue
        for option in criterion.options:
            found.setdefault(option.name, (option, []))[1].append(criterion.name)
    return found


def get(name: str) -> Criterion:
    """The criterion called ``name``.

    Args:
        name: one of ``CRITERIA`` (``kl``, ``kl-approx``, ``l1``, ``bn``, ``taylor``, ``random``, and
            any registered with :func:`register_criterion`).

    Returns:
        Its :class:`Criterion` entry.

    Raises:
        CurlpruneError: unknown name (the message lists the valid ones).
    """
    if name not in CRITERIA:
        raise CurlpruneError(f"unknown criterion {name!r}: use one of {', '.join(CRITERIA)}")
    return CRITERIA[name]


def _first_output(model: nn.Module, images: torch.Tensor):
    """The model's output on the first image of ``images`` ``[N, C, H, W]``, in eval mode, without gradients."""
    with torch.no_grad(), eval_mode(model):
        return model(images[:1])


def gives_logits(model: nn.Module, images: torch.Tensor) -> bool:
    """Whether ``model`` returns one ``[N, classes]`` logits tensor (not a dict, a tuple or a dense
    ``[N, K, H, W]`` map) on the first image of ``images`` ``[N, C, H, W]`` (run in eval mode, without
    gradients; the model's mode is restored). The test :func:`check_logits` applies.
    """
    return is_logits(_first_output(model, images))


def check_logits(name: str, model: nn.Module, images: torch.Tensor) -> None:
    """Refuse a criterion that reads class probabilities on a model without a single logits output.

    Args:
        name: the criterion; model: the model to score; images: ``[N, C, H, W]`` calibration batch
            (one image is run, in eval mode, without gradients).

    Raises:
        CurlpruneError: the model's output is not one ``[N, classes]`` tensor (a dict, tuple, or a
            dense ``[N, K, H, W]`` map); the message names the criteria that read only weights.
    """
    out = _first_output(model, images)
    if is_logits(out):
        return
    if isinstance(out, torch.Tensor):
        got = f"a tensor of shape {list(out.shape)}"
    else:
        kind = "dict" if isinstance(out, Mapping) else "tuple" if isinstance(out, (tuple, list)) else type(out).__name__
        got = f"a {kind} of {len(out) if hasattr(out, '__len__') else 'several'} outputs"
    working = ", ".join(c.name for c in CRITERIA.values() if not c.needs_logits)
    raise CurlpruneError(
        f"criterion {name!r} needs a classifier whose output is one [N, classes] logits tensor, but the model returns {got} "
        f"(dense or several outputs); use a criterion that reads only the weights: {working}"
    )


def compute_scores(
    name: str,
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    *,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    **options,
) -> Scores:
    """Score every prunable group of ``model`` with the criterion ``name``.

    The model is scored in eval mode (its modes are restored), on its own device: ``images`` and
    ``labels`` are moved there (every criterion makes its tensors on the images' device, so a
    model on a GPU is scored there; docs/method.md §10).

    Args:
        name: the criterion (``CRITERIA``).
        model: the unpruned model.
        groups: ``trace(model, x)``.
        images: calibration batch ``[N, C, H, W]``, float, already transformed (criteria that need data).
        labels: ``[N]`` int64 class indices (criteria that need labels: ``taylor``).
        seed: the seed of criteria with a ``seed`` option (``random``); ignored by the others.
        progress: called with finished work items (criteria with ``work``: ``kl``, ``kl-approx``;
            see :func:`work_items`).
        **options: the criterion's declared options by name (e.g. ``budget_mb`` in MiB for ``kl``,
            ``approx_classes`` for ``kl-approx``; unset ones take their declared defaults); any
            other keyword goes to the function unchanged (e.g. ``chunk_mb`` for ``kl``).

    Returns:
        Scores: group name -> float64 array ``(width,)`` for every prunable group; lower = less important.

    Raises:
        CurlpruneError: unknown criterion, or images/labels missing where the criterion needs them.

    Source: docs/method.md §2 (the KL score).
    """
    criterion = get(name)
    if criterion.needs_data and (images is None or len(images) == 0):
        raise CurlpruneError(f"criterion {name!r} needs calibration images: pass --data (a dataset folder/zip or 'digits')")
    if criterion.needs_labels and labels is None:
        raise CurlpruneError(f"criterion {name!r} needs labels for its calibration images: use a labelled dataset")
    values = {"seed": seed, **options}
    kwargs = {option.argument: values.get(option.name, option.default) for option in criterion.options}
    kwargs.update({k: v for k, v in options.items() if k not in criterion.defaults()})
    device = next((p.device for p in model.parameters()), None)
    if criterion.needs_logits:  # one [N, classes] output, or one line naming the criteria that work
        check_logits(name, model, images if device is None or images is None else images.to(device))
    if criterion.needs_data:
        kwargs["images"] = images if device is None else images.to(device)
    if criterion.needs_labels:
        kwargs["labels"] = labels if device is None else labels.to(device)
    if criterion.reports_progress:
        kwargs["progress"] = progress
    with eval_mode(model):
        return criterion.function(model, groups, **kwargs)


def work_items(name: str, groups: Sequence[ChannelGroup]) -> int:
    """How many progress steps ``compute_scores(name, ...)`` reports.

    Args:
        name: the criterion.
        groups: the model's channel groups.

    Returns:
        The criterion's ``work(groups)`` (``kl``, ``kl-approx``: the number of units of the
        prunable groups); 0 for criteria that report no progress.
    """
    criterion = get(name)
    return criterion.work(groups) if criterion.work is not None else 0


_BUDGET = Option("budget_mb", float(DEFAULT_BUDGET_MB), "memory (MiB) for the stacked ablations", changes_scores=False)

for _criterion in (
    Criterion("kl", kl_scores, "CURL: KL(q_masked || p) per channel, exact", needs_data=True,
              options=(_BUDGET,), work=unit_count, one_scale=True, needs_logits=True, per_group=True),
    Criterion("kl-approx", kl_approx_scores, "Fisher (2nd-order) approximation of the KL score from a few backward passes",
              needs_data=True, work=unit_count, one_scale=True, needs_logits=True,
              options=(_BUDGET, Option("approx_classes", DEFAULT_APPROX_CLASSES, "most probable classes in its Fisher sum",
                                       keyword="classes")), per_block=True),
    Criterion("l1", l1_scores, "L1 norm of the producing filters"),
    Criterion("bn", bn_scores, "|gamma| of the group's batch norms"),
    Criterion("taylor", taylor_scores, "first-order Taylor |sum a*dL/da| (uses labels)", needs_data=True, needs_labels=True,
              needs_logits=True, per_block=True),
    Criterion("random", random_scores, "seeded random scores (control)",
              options=(Option("seed", 0, "seed of the random scores", shared=True),)),
):
    register_criterion(_criterion)
