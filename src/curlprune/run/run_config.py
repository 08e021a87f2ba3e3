"""The YAML run config: :class:`RunConfig`, its parsing and checks.

A config names the model, its weights, the data and one section per stage; every key of a
section is a field of that stage's config dataclass, so every hyperparameter is configurable and
a misspelt key is an error, not a silent default::

    run_dir: runs/r56-small
    seed: 0
    model: cifar:resnet56
    weights: ../shared/models/resnet56-cifar10jpeg.pt
    data: ../shared/data/cifar10-jpeg.zip   # or "digits"
    train_per_class: 500                     # optional class-balanced subset of the train split
    val_per_class: 100                       # optional validation split held out of train (or val_fraction)
    stages: [prune, distill]                 # the default; add refine for the paper's label refinement
    prune:   {criterion: kl, target_macs: 0.33}
    distill: {epochs: 30}                    # ce_weight 0.5 by default; ce_weight: 0 = the paper's loss

It also holds the checks that a run directory belongs to this config (:func:`check_same_run`,
:func:`check_finished_prune`); the run itself is :mod:`curlprune.run.pipeline`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from curlprune.errors import CurlpruneError
from curlprune.models import by_import_path
from curlprune.models.import_path import parse_input_shape
from curlprune.recover.recipes import recipe_settings, recipe_stages
from curlprune.recover.registry import get_stage, recovery_stages, stage_names
from curlprune.run import strict_yaml
from curlprune.run.prune_config import PruneConfig, canonical_settings, stage_identity
from curlprune.store import DONE_FILE, LATER, PRUNE_STAGE, check_same_settings
from curlprune.store.runlock import check_named
from curlprune.validate import check_ranges, check_types, check_value
from curlprune.data.streaming import DataSettings
from curlprune.data.valsplit import check_val_settings

IDENTITY_KEYS = ("model", "weights", "num_classes", "data", "train_per_class", "seed", "input_size", "val_per_class", "val_fraction",
                 "model_kwargs", "input_shape")
DEFAULT_STAGES = ["prune", "distill"]
"""The stages of a config that lists none and names no recipe: chosen on the validation split of the
small-data benchmark, distilling the whole budget beat distill + refine (benchmarks/results/small_data.md,
docs/method.md §8). A recipe brings its own (:func:`curlprune.recover.recipes.recipe_stages`)."""
DEFAULT_RUN_DIR = "runs/run"
NOT_STORED = {"not_stored": True}  # RunConfig field metadata: how the config was written, neither a key nor in config.json


@dataclass
class RunConfig:
    """The top level of a run config (stage sections are parsed into their own dataclasses).

    model:           registry name of the unpruned model (also the teacher), e.g. cifar:resnet56, or a
                     model of your own by import path: ``mypkg.nets:MyNet`` (importable) or
                     ``path/to/file.py:build_fn`` (:mod:`curlprune.models.import_path`).
    model_kwargs:    keyword arguments the model is called with (an import-path model's own).
    input_shape:     ``[C, S, S]``: the input of an import-path model (required for one).
    weights:         its weights (state-dict file or torchvision weight name).
    num_classes:     classifier outputs when they differ from the model's default; in a run that
                     starts with ``finetune`` on weights of other classes, the classes of the new
                     classifier (default: the data's; see :attr:`curlprune.run.pipeline.Run.new_head`).
    data:            "digits", or an ImageFolder directory / zip with train/ and test/.
    train_per_class: train on a seeded class-balanced subset of this many images per class.
    input_size:      square input side when not the model's default (transforms resize to it).
    val_per_class:   hold this many training images of every class out as the validation split
                     (seeded by ``seed``, class-balanced; :mod:`curlprune.data.valsplit`). No stage trains on
                     them, the calibration set included; the recovery stages report validation top-1.
    val_fraction:    or hold out this share of every class, in (0, 1). At most one of the two; data
                     with its own val/ split uses that and refuses both.
    streaming:       how an ImageFolder folder or zip is read (:mod:`curlprune.data.streaming`): ``auto``
                     (None; decoded into memory unless its estimated decoded size exceeds
                     ``memory_budget_gb``, then decoded on the fly), ``true`` (always on the fly) or ``false``.
    memory_budget_gb: the budget of ``auto``, in GB; None = half of this machine's memory.
    data_workers:    DataLoader worker processes that decode streamed images; None = min(4, CPUs).
                     Where and how the images are read, not which: no part of a run's identity.
    recipe:          a named preset of the recovery stages' settings (:mod:`curlprune.recover.recipes`;
                     ``paper``: the authors' constants); a section's own keys override it. None = the defaults.
                     Without ``stages`` a recipe also gives the stage list (``paper``: prune, distill, refine).
    stages:          the stages in order; default :data:`DEFAULT_STAGES` (prune, distill), or the recipe's.
    stages_listed:   whether the config listed them (not a config key, not stored): a run folder that ran
                     more stages than a default list is not shrunk silently (:func:`check_same_run`).
    """

    model: str
    weights: str | None = None
    num_classes: int | None = None
    data: str = "digits"
    run_dir: str = DEFAULT_RUN_DIR
    seed: int = 0
    train_per_class: int | None = None
    input_size: int | None = field(default=None, metadata=LATER)
    val_per_class: int | None = field(default=None, metadata=LATER)
    val_fraction: float | None = field(default=None, metadata=LATER)
    model_kwargs: dict[str, Any] | None = field(default=None, metadata=LATER)
    input_shape: list[int] | None = field(default=None, metadata=LATER)
    recipe: str | None = field(default=None, metadata=LATER)
    streaming: str | None = field(default=None, metadata=LATER)
    memory_budget_gb: float | None = field(default=None, metadata=LATER)
    data_workers: int | None = field(default=None, metadata=LATER)
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    sections: dict[str, Any] = field(default_factory=dict)
    stages_listed: bool = field(default=True, metadata=NOT_STORED)  # False: the config gave no stages (the default's)


def all_stages() -> tuple[str, ...]:
    """Every stage a config may list: ``prune``, then the registered recovery stages
    (:mod:`curlprune.recover.registry`) in their order."""
    return (PRUNE_STAGE,) + stage_names()


def stage_config(stage: str) -> type:
    """The settings dataclass of a stage's section: :class:`PruneConfig` or the recovery stage's ``config``.

    Raises:
        CurlpruneError: ``stage`` is neither ``prune`` nor a registered recovery stage.
    """
    return PruneConfig if stage == PRUNE_STAGE else get_stage(stage).config


def _build_section(stage: str, values: Any, where: str, defaults: dict[str, Any]) -> Any:
    """The stage's config dataclass from its section; unknown keys are errors that list the valid
    ones, and every value is checked against its field's type (:func:`curlprune.validate.check_types`)."""
    cls = stage_config(stage)
    if values is not None and not isinstance(values, dict):
        example = "{target_macs: 0.5}" if stage == PRUNE_STAGE else "{epochs: 10}"
        raise CurlpruneError(f"{where}: section '{stage}' must be a mapping of settings, e.g. {stage}: {example}")
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise CurlpruneError(f"{where}: unknown key '{unknown[0]}' in section '{stage}'; valid keys: {', '.join(sorted(names))}")
    for key, value in defaults.items():
        if key in names:
            values.setdefault(key, value)
    values = check_types(cls, values, f"{where}: section '{stage}'")  # 2.5 epochs, "1e-4" (issue 12)
    try:
        return cls(**values)
    except CurlpruneError as exc:  # a range or consistency check of the settings class: say where it is
        raise CurlpruneError(f"{where}: section '{stage}': {exc}") from None
    except (TypeError, ValueError) as exc:
        raise CurlpruneError(f"{where}: bad value in section '{stage}': {exc}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file.

    Returns:
        The raw mapping (unchecked; see :func:`parse_config`).
    Raises:
        CurlpruneError: the file is missing, not text (UTF-8), not YAML, holds a key twice in one mapping (naming the
            key and both lines), or is not a mapping.
    """
    path = Path(path)
    if path.is_dir():
        raise CurlpruneError(f"config {path} is a folder, not a YAML file: name the config file (a run folder's "
                             "config.json, its resolved settings, runs it again)")
    if not path.is_file():
        raise CurlpruneError(f"config {path} does not exist: write one (see `curlprune run --help` for an example)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CurlpruneError(f"config {path} is not a text file (not UTF-8: byte 0x{exc.object[exc.start]:02x} at offset {exc.start}): "
                             "give a YAML config (see `curlprune run --help` for an example)") from None
    try:
        raw = strict_yaml.safe_load(text) or {}  # a key given twice is an error (issue 18)
    except yaml.YAMLError as exc:
        raise CurlpruneError(f"config {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise CurlpruneError(f"config {path} must be a mapping of keys to values (model: ..., data: ..., stages: [...])")
    return raw


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Parse and check a YAML run config.

    Args:
        path: the YAML file.
        overrides: top-level keys that replace the file's (e.g. ``run_dir`` from ``--out``); None values are ignored.
    Returns:
        The checked :class:`RunConfig`.
    Raises:
        CurlpruneError: see :func:`read_config_file` and :func:`parse_config`.
    """
    raw = read_config_file(path)
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return parse_config(raw, str(path))


def _run_dir(raw: dict[str, Any], where: str) -> str:
    """The run folder (``run_dir``, or ``--out``): an empty one would be the current folder."""
    run_dir = raw.get("run_dir", DEFAULT_RUN_DIR)
    check_named(str(run_dir), f"{where}: run_dir (--out)")
    return str(run_dir)


def _check_stages(stages: Any, where: str) -> list[str]:
    if isinstance(stages, str) or not isinstance(stages, list) or not stages:
        raise CurlpruneError(f"{where}: 'stages' must be a non-empty list, e.g. stages: [prune, distill, refine]")
    known = all_stages()
    bad = [s for s in stages if s not in known]
    if bad:
        raise CurlpruneError(f"{where}: unknown stage '{bad[0]}'; stages are {', '.join(known)}")
    if len(set(stages)) != len(stages):
        raise CurlpruneError(f"{where}: a stage is listed twice in {stages}: list each stage once")
    transfer = [entry.name for entry in recovery_stages() if entry.transfer]  # may run before prune (a transfer)
    before = stages[:stages.index(PRUNE_STAGE)] if PRUNE_STAGE in stages else []
    if before and not (len(before) == 1 and before[0] in transfer):
        follow = " or ".join(f"'{name}'" for name in transfer)
        raise CurlpruneError(f"{where}: 'prune' must be the first stage, or follow only {follow} (got {stages})")
    return [str(s) for s in stages]


def _optional_int(raw: dict[str, Any], key: str, where: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CurlpruneError(f"{where}: '{key}' must be a positive whole number (got {value!r})")
    return value


def _optional_fraction(raw: dict[str, Any], key: str, where: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise CurlpruneError(f"{where}: '{key}' must be a number in (0, 1), e.g. 0.1 (got {value!r})")
    return float(value)


def _model_kwargs(raw: dict[str, Any], where: str) -> dict[str, Any] | None:
    value = raw.get("model_kwargs")
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise CurlpruneError(f"{where}: 'model_kwargs' must be a mapping of keyword arguments, e.g. model_kwargs: {{width: 32}}")
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise CurlpruneError(f"{where}: 'model_kwargs' must hold plain values (numbers, strings, lists, mappings)") from None
    return dict(value) or None


def _input_shape(raw: dict[str, Any], where: str) -> list[int] | None:
    value = raw.get("input_shape")
    if value is None:
        if by_import_path(str(raw["model"])):
            raise CurlpruneError(f"{where}: model {raw['model']!r} is named by import path, so its input shape is not known: "
                                 "add input_shape: [C, S, S] (e.g. [3, 32, 32])")
        return None
    try:
        return parse_input_shape(value)
    except CurlpruneError as exc:
        raise CurlpruneError(f"{where}: 'input_shape': {exc}") from None


def _unused_section_error(stage: str, stages: list[str], recipe: str | None, where: str) -> CurlpruneError:
    """The one line for a config that lists no ``stages`` but has a section for ``stage``, which the
    stage list it gets (``stages``: the default, or ``recipe``'s) leaves out: which list that is, and
    the lists that would run the stage. A transfer stage (``finetune``) is offered first (fine-tune,
    then prune: a transfer) or after prune alone (prune + CE fine-tuning), the orders the README uses."""
    whose = f"the stages of recipe '{recipe}'" if recipe is not None else "the default stages"
    why = " (refine no longer runs by default)" if stage == "refine" and recipe is None else ""
    if get_stage(stage).transfer:
        add = (f"[{', '.join([stage, *stages])}] (fine-tune before pruning: a transfer) or "
               f"[{PRUNE_STAGE}, {stage}] (fine-tune the pruned model)")
    else:
        add = f"[{', '.join(s for s in all_stages() if s in stages or s == stage)}]"
    return CurlpruneError(f"{where}: section '{stage}' is given but the config lists no stages, and {whose} "
                          f"[{', '.join(stages)}] leave it out{why}: add stages: {add} to run it, or remove the section")


def parse_config(raw: dict[str, Any], where: str = "config") -> RunConfig:
    """Check a config mapping and turn it into a :class:`RunConfig` with typed stage sections.

    Args:
        raw: the mapping (top-level keys and one section per stage).
        where: names the source in error messages (a file name, "command line").
    Returns:
        The :class:`RunConfig`; ``sections`` holds a config dataclass per stage listed or given.
    Raises:
        CurlpruneError: an unknown key (the message lists the valid ones), a missing model, bad
            stages, seed or counts, or a bad value in a stage section.
    """
    top = {f.name for f in dataclasses.fields(RunConfig) if not f.metadata.get("not_stored")} - {"sections"}
    known = all_stages()
    unknown = sorted(set(raw) - top - set(known))
    if unknown:
        raise CurlpruneError(f"{where}: unknown key '{unknown[0]}'; valid keys: {', '.join(sorted(top | set(known)))}")
    if not raw.get("model"):
        raise CurlpruneError(f"{where}: 'model' is missing (e.g. model: cifar:resnet56)")
    recipe = raw.get("recipe")
    if recipe is not None and not isinstance(recipe, str):
        raise CurlpruneError(f"{where}: 'recipe' must be a name, e.g. recipe: paper (got {recipe!r})")
    recipe_settings(recipe, PRUNE_STAGE, where)  # an unknown name is an error whatever the stages
    stages = _check_stages(raw.get("stages", recipe_stages(recipe) or DEFAULT_STAGES), where)
    unused = [s for s in known if s in raw and s not in stages]
    if "stages" not in raw and unused:  # e.g. a refine section written when refine ran by default: not silently skipped
        raise _unused_section_error(unused[0], stages, recipe, where)
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CurlpruneError(f"{where}: 'seed' must be a whole number (got {seed!r})")
    check_value("seed", seed, where)  # -1 or 2**32 would crash deep in numpy (issue 18)
    data_settings = DataSettings.of(raw.get("streaming"), raw.get("memory_budget_gb"), raw.get("data_workers"), where)
    sections = {s: _build_section(s, raw.get(s), where, {"seed": seed, **recipe_settings(recipe, s, where)})
                for s in known if s in stages or s in raw}
    cfg = RunConfig(
        model=str(raw["model"]),
        weights=None if raw.get("weights") is None else str(raw["weights"]),
        num_classes=_optional_int(raw, "num_classes", where),
        data=str(raw.get("data", "digits")),
        run_dir=_run_dir(raw, where),
        seed=seed,
        train_per_class=_optional_int(raw, "train_per_class", where),
        input_size=_optional_int(raw, "input_size", where),
        val_per_class=_optional_int(raw, "val_per_class", where),
        val_fraction=_optional_fraction(raw, "val_fraction", where),
        model_kwargs=_model_kwargs(raw, where),
        input_shape=_input_shape(raw, where),
        recipe=recipe,
        streaming=None if raw.get("streaming") is None else data_settings.streaming,
        memory_budget_gb=data_settings.memory_budget_gb,
        data_workers=data_settings.workers,
        stages=stages,
        sections=sections,
        stages_listed="stages" in raw,
    )
    check_ranges(cfg, where)  # every number in its range (curlprune.validate.RANGES)
    check_val_settings(cfg.val_per_class, cfg.val_fraction, where)  # at most one of the two
    return cfg


def data_settings(cfg: RunConfig) -> DataSettings:
    """How the run reads its data folder (:class:`curlprune.data.streaming.DataSettings`)."""
    return DataSettings.of(cfg.streaming, cfg.memory_budget_gb, cfg.data_workers)


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain JSON-able values (what ``config.json`` holds): the top-level keys and one mapping per stage section."""
    top = {k: v for k, v in _as_dict(cfg).items() if k != "sections"}
    top.update({name: _as_dict(section) for name, section in cfg.sections.items()})
    return top


def _as_dict(obj: Any) -> dict[str, Any]:
    """``dataclasses.asdict`` without the fields added in a later version (metadata ``LATER``) while they are None."""
    later = {f.name for f in dataclasses.fields(obj) if f.metadata.get("omit_when_none")}
    hidden = {f.name for f in dataclasses.fields(obj) if f.metadata.get("not_stored")}
    return {k: v for k, v in dataclasses.asdict(obj).items() if not (k in later and v is None) and k not in hidden}


def check_same_run(previous: dict[str, Any], current: dict[str, Any], run_dir: Path, stages_listed: bool = True) -> None:
    """A run directory belongs to one model, data and seed; its stage list may only grow or shrink at the end,
    and shrink only when the config lists its stages (a folder that ran refine when refine was a default
    stage is not cut back to today's default ``[prune, distill]`` unasked).

    Args:
        previous: the directory's ``config.json``.
        current: :func:`config_to_dict` of the config now.
        run_dir: the directory (for the message).
        stages_listed: whether the config now lists its stages (:attr:`RunConfig.stages_listed`).
    Raises:
        CurlpruneError: the identity settings differ, the stage lists are not prefixes of each other, or
            the folder ran more stages than the default list of a config that lists none.
    """
    check_same_settings(previous, {k: current.get(k) for k in IDENTITY_KEYS},
                        f"{run_dir} holds a run with different settings: {{differ}}; use another run_dir (--out) or delete {run_dir}")
    old, new = list(previous.get("stages", [])), list(current["stages"])
    shared = min(len(old), len(new))
    if old[:shared] != new[:shared]:
        raise CurlpruneError(
            f"{run_dir} holds a run with stages {old}, not a prefix or extension of {new}: use another run_dir (--out) or delete {run_dir}"
        )
    if not stages_listed and len(old) > len(new):
        raise CurlpruneError(
            f"{run_dir} holds a run with stages [{', '.join(old)}], and this config lists no stages: the default is now "
            f"[{', '.join(new)}] (docs/method.md §8): add stages: [{', '.join(old)}] to continue it, or "
            f"stages: [{', '.join(new)}] to end it after {new[-1]}; or use another run_dir (--out)"
        )


def check_finished_prune(prune_dir: Path, cfg: PruneConfig) -> None:
    """A finished prune stage is never redone with other settings: the stages after it started from its model.
    Targets are compared in one canonical form (:func:`curlprune.run.prune_config.canonical_settings`).

    Raises:
        CurlpruneError: ``prune_dir`` holds a finished prune stage whose settings differ from ``cfg``.
    """
    try:
        previous = json.loads((prune_dir / DONE_FILE).read_text())["settings"]["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # not finished (or not readable): the prune stage itself decides
    check_same_settings(canonical_settings(previous), stage_identity(cfg),  # "0.5" written before = 0.5 now
                        f"{prune_dir} holds a finished prune stage with other settings: {{differ}}; "
                        f"use another run_dir (--out), or delete {prune_dir} and the stages after it")
