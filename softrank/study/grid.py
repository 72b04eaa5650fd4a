r"""A declarative grid of training configurations, each with a stable id.

A grid is a plain dict (or a JSON file holding one)::

    {
      "name": "mnist-mlp",
      "measures": {"gram_samples": 500},          # MeasureOptions, shared by all blocks
      "blocks": [
        {"fixed": {"dataset": "mnist", "arch": "mlp", "epochs": 30},
         "vary":  {"width": [32, 128], "weight_decay": [1e-4, 1e-2], "n_train": [500, 2000]}}
      ]
    }

A single block may stand at the top level (``{"fixed": ..., "vary": ...}``). Each block expands
to the Cartesian product of its ``vary`` lists (in the order given) on top of its ``fixed``
values and the :class:`TrainConfig` defaults. The id of a configuration is the first 12 hex
digits of the SHA-1 of its canonical JSON (sorted keys, values cast to their declared types,
measurement options included): the same configuration has the same id in every grid, run and
process, so the results store can key on it.

Every value of a grid is validated before anything runs, against the declared type of its
field (integers, finite numbers, true/false, strings, lists of strings), its range, and its
valid choices (:data:`CHOICES`); :func:`expand_grid` reports every bad value at once, each with
its place in the grid (``vary['width'][1]``) and what it should be.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from ..curvature import APPROXIMATIONS
from ..datasets import DATASET_NAMES
from ..loo import LOO_METHODS

__all__ = ["TrainConfig", "MeasureOptions", "HYPERPARAMETERS", "CHOICES", "expand_grid",
           "load_grid", "config_from_dict"]

ARCHITECTURES = ("mlp", "cnn")
OPTIMIZERS = ("adam", "sgd")

#: the valid values of the fields that take a name (each element, for the lists)
CHOICES = {"arch": ARCHITECTURES, "optimizer": OPTIMIZERS, "dataset": DATASET_NAMES,
           "soft_rank": APPROXIMATIONS, "tic": APPROXIMATIONS, "loo": LOO_METHODS}
#: integer fields that may be 0 (the others must be ≥ 1)
_NON_NEGATIVE = {"seed", "data_seed", "finish", "loo_points"}
#: number fields that must be > 0 (the others only finite)
_POSITIVE = {"weight_decay", "lr"}


def _checked(where: str, name: str, value: Any, kind: str) -> Any:
    """``value`` of field ``name`` (declared type ``kind``) cast to it, or a ValueError that
    names ``where`` it is, what it is and what it should be. Fields of other types pass."""
    def bad(want):
        return ValueError(f"{where}: expected {want}; got {value!r}")

    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
    elif kind == "int":
        low = 0 if name in _NON_NEGATIVE else 1
        ok = isinstance(value, Integral) or (isinstance(value, Real) and math.isfinite(value)
                                             and float(value).is_integer())
        if isinstance(value, bool) or not ok or value < low:
            raise bad(f"an integer ≥ {low}")
        value = int(value)
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise bad("a finite number" + (" > 0" if name in _POSITIVE else ""))
        value = float(value)
        if name in _POSITIVE and not value > 0:
            raise bad("a finite number > 0")
    elif kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
    elif kind == "tuple[str, ...]":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            example = value if isinstance(value, str) else CHOICES.get(name, ("name",))[0]
            raise bad(f'a list of names, e.g. ["{example}"]')
        value = tuple(value)
    else:
        return value
    choices = CHOICES.get(name)
    if choices is not None:
        unknown = [v for v in (value if isinstance(value, tuple) else (value,))
                   if v not in choices]
        if unknown:
            raise ValueError(f"{where}: unknown value(s) {unknown}; valid: {list(choices)}")
    return value


def _validate_fields(obj, prefix: str = "") -> None:
    """Check and cast every field of a frozen dataclass in place (see :func:`_checked`)."""
    for f in fields(obj):
        object.__setattr__(obj, f.name, _checked(f"{prefix}{f.name}", f.name,
                                                 getattr(obj, f.name), f.type))
#: configuration fields that are hyperparameters (axes of the granulated Kendall coefficient)
HYPERPARAMETERS = ("arch", "width", "depth", "weight_decay", "lr", "batch_size", "n_train",
                   "epochs", "optimizer")


@dataclass(frozen=True)
class MeasureOptions:
    """What to measure on each trained model, and at which cost.

    ``soft_rank``: approximations of :math:`\\mathrm{rank}_\\Lambda(F)`; ``tic``: those of the
    Fisher TIC; ``'gram'`` (exact) runs on ``gram_samples`` random training points (all when
    n ≤ gram_samples). ``loo``: ApproxLOO methods ('exact': only when n ≤ gram_samples;
    'kfac': all points). ``hessian``: Tr H and λ_max(H) on ``hessian_samples`` training points
    (dense when p ≤ ``dense_max_params``, else matrix-free: Hutch++ with 3·``hessian_probes``
    products, ``hessian_iterations`` Lanczos steps). ``loo_points``: the points 'nystrom' and
    'cavity' keep exactly and 'subsample' measures (0: ApproxLOO's defaults, 300, 1,000 and
    all).
    ``test_samples``: test points for α on test data. ``ece_bins``: equal-width confidence
    bins of the expected calibration error.
    """

    soft_rank: tuple[str, ...] = ("gram", "kfac", "ekfac", "diagonal")
    tic: tuple[str, ...] = ("gram", "kfac")
    loo: tuple[str, ...] = ("exact", "kfac")
    hessian: bool = True
    gram_samples: int = 500
    hessian_samples: int = 1000
    hessian_probes: int = 20
    hessian_iterations: int = 20
    dense_max_params: int = 3000
    test_samples: int = 1000
    ece_bins: int = 15
    batch_size: int = 256
    finish: int = 0  # L-BFGS iterations to finish each net and measure it again (0: as trained)
    loo_points: int = 0  # points of ApproxLOO 'nystrom', 'cavity', 'subsample' (0: defaults)

    def __post_init__(self):
        _validate_fields(self, "measures.")


@dataclass(frozen=True)
class TrainConfig:
    """One model of the study: data, architecture, optimizer and measurement options.

    ``width``: hidden units (MLP) or channels (CNN); ``depth``: hidden layers (MLP) or
    conv blocks (CNN). ``weight_decay`` is Λ = wd·I of the objective mean loss + ½θᵀΛθ.
    ``n_train`` training points (all of them are trained on: n of the gap estimates),
    ``n_test`` test points for the observed gap, drawn at random with ``data_seed``.
    ``seed`` seeds the initialization and the minibatch order.
    """

    dataset: str
    arch: str = "mlp"
    width: int = 128
    depth: int = 1
    weight_decay: float = 1e-3
    lr: float = 1e-3
    batch_size: int = 64
    n_train: int = 1000
    n_test: int = 2000
    epochs: int = 20
    optimizer: str = "adam"
    seed: int = 0
    data_seed: int = 0
    measures: MeasureOptions = field(default_factory=MeasureOptions)

    def __post_init__(self):
        if isinstance(self.measures, dict):
            _check_keys(self.measures, _MEASURE_FIELDS, "measures")
            object.__setattr__(self, "measures", MeasureOptions(**self.measures))
        if not isinstance(self.measures, MeasureOptions):
            raise ValueError(f"measures: expected an object of measurement options; got "
                             f"{self.measures!r}")
        _validate_fields(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON-ready); :func:`config_from_dict` inverts it."""
        return asdict(self)

    @property
    def id(self) -> str:
        """Stable 12-hex-digit id: SHA-1 of the canonical JSON of :meth:`to_dict`."""
        d = self.to_dict()
        for key in ("finish", "loo_points"):  # ids of grids without them stay as they were
            if not d["measures"][key]:
                del d["measures"][key]
        text = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def hyperparameters(self) -> dict[str, Any]:
        """The flat training fields (no measurement options), as stored in each result row."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "measures"}


_CONFIG_FIELDS = {f.name for f in fields(TrainConfig)} - {"measures"}
_MEASURE_FIELDS = {f.name for f in fields(MeasureOptions)}


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from :meth:`TrainConfig.to_dict` output (or any subset of it)."""
    d = dict(d)
    _check_keys(d, _CONFIG_FIELDS | {"measures"}, "configuration")
    measures = d.pop("measures", {}) or {}
    if isinstance(measures, dict):
        _check_keys(measures, _MEASURE_FIELDS, "measures")
        measures = MeasureOptions(**measures)
    return TrainConfig(**d, measures=measures)


def _check_keys(d: dict, valid: set[str], what: str) -> None:
    unknown = sorted(set(d) - valid)
    if unknown:
        raise ValueError(f"unknown {what} key(s) {unknown}; valid keys: {sorted(valid)}")


_FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}
_MEASURE_TYPES = {f.name: f.type for f in fields(MeasureOptions)}


def _block_problems(block: Any, where: str) -> list[str]:
    """Every problem of one block (keys, shapes, values), each naming its place."""
    if not isinstance(block, dict):
        return [f"{where}: expected an object with 'fixed' and/or 'vary'; got {block!r}"]
    problems = []
    unknown = sorted(set(block) - {"fixed", "vary"})
    if unknown:
        problems.append(f"{where}: unknown key(s) {unknown}; valid keys: ['fixed', 'vary']")
    fixed, vary = block.get("fixed", {}), block.get("vary", {})
    for name, part in (("fixed", fixed), ("vary", vary)):
        if not isinstance(part, dict):
            problems.append(f"{where}{name}: expected an object {{key: value}}; got {part!r}")
    if problems:
        return problems
    for name, part in (("fixed", fixed), ("vary", vary)):
        unknown = sorted(set(part) - _CONFIG_FIELDS)
        if unknown:
            problems.append(f"{where}{name}: unknown key(s) {unknown}; valid keys: "
                            f"{sorted(_CONFIG_FIELDS)}")
    both = sorted(set(fixed) & set(vary))
    if both:
        problems.append(f"{where}: {both} are both fixed and varied")
    if "dataset" not in fixed and "dataset" not in vary:
        problems.append(f"{where}: every block needs a 'dataset' (fixed or varied)")
    for key, value in fixed.items():
        problems += _value_problems(f"{where}fixed[{key!r}]", key, value, _FIELD_TYPES)
    for key, values in vary.items():
        if not isinstance(values, list) or not values:
            problems.append(f"{where}vary[{key!r}]: expected a non-empty list of values; got "
                            f"{values!r}")
            continue
        for i, value in enumerate(values):
            problems += _value_problems(f"{where}vary[{key!r}][{i}]", key, value, _FIELD_TYPES)
    return problems


def _value_problems(where: str, key: str, value: Any, types: dict) -> list[str]:
    if key not in types:
        return []
    try:
        _checked(where, key, value, types[key])
    except ValueError as e:
        return [str(e)]
    return []


def _grid_problems(spec: dict) -> list[str]:
    """Every problem of a grid dict, before any configuration is built."""
    problems = []
    unknown = sorted(set(spec) - {"name", "measures", "blocks", "fixed", "vary"})
    if unknown:
        problems.append(f"grid: unknown key(s) {unknown}; valid keys: "
                        "['blocks', 'fixed', 'measures', 'name', 'vary']")
    if "blocks" in spec and ({"fixed", "vary"} & set(spec)):
        problems.append("grid: give either 'blocks' or a single top-level 'fixed'/'vary', "
                        "not both")
    measures = spec.get("measures", {})
    if not isinstance(measures, dict):
        problems.append(f"measures: expected an object {{option: value}}; got {measures!r}")
    else:
        unknown = sorted(set(measures) - _MEASURE_FIELDS)
        if unknown:
            problems.append(f"measures: unknown key(s) {unknown}; valid keys: "
                            f"{sorted(_MEASURE_FIELDS)}")
        for key, value in measures.items():
            problems += _value_problems(f"measures[{key!r}]", key, value, _MEASURE_TYPES)
    if "blocks" in spec:
        blocks = spec["blocks"]
        if not isinstance(blocks, list) or not blocks:
            return problems + [f"blocks: expected a non-empty list of blocks; got {blocks!r}"]
        for i, block in enumerate(blocks):
            problems += _block_problems(block, f"blocks[{i}].")
    else:
        problems += _block_problems({k: spec[k] for k in ("fixed", "vary") if k in spec}, "")
    return problems


def _expand_block(block: dict, measures: dict) -> list[TrainConfig]:
    fixed, vary = dict(block.get("fixed", {})), dict(block.get("vary", {}))
    keys = list(vary)
    base = config_from_dict({**fixed, "measures": measures,
                             "dataset": fixed.get("dataset", vary.get("dataset", [""])[0])})
    return [replace(base, **dict(zip(keys, combo))) if keys else base
            for combo in itertools.product(*(vary[k] for k in keys))]


def expand_grid(spec: dict[str, Any]) -> list[TrainConfig]:
    """All configurations of a grid dict, in order, without duplicates (by id).

    The whole grid is validated first: a ValueError lists every unknown key and every bad
    value (with its place, e.g. ``blocks[0].vary['width'][1]``, and what it should be) before
    any configuration is built, so nothing is trained on a grid with a mistake in it."""
    if not isinstance(spec, dict):
        raise TypeError(f"a grid is a dict; got {type(spec).__name__}")
    problems = _grid_problems(spec)
    if problems:
        raise ValueError(f"invalid grid ({len(problems)} problem"
                         f"{'s' if len(problems) > 1 else ''}):\n  " + "\n  ".join(problems))
    blocks = spec.get("blocks") or [{k: spec[k] for k in ("fixed", "vary") if k in spec}]
    measures = dict(spec.get("measures", {}))
    out: dict[str, TrainConfig] = {}
    for block in blocks:
        for cfg in _expand_block(block, measures):
            out.setdefault(cfg.id, cfg)
    return list(out.values())


def load_grid(path: str | Path) -> tuple[dict[str, Any], list[TrainConfig]]:
    """(grid dict, its configurations) from a JSON file."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise FileNotFoundError(2, "no such grid file", str(path)) from None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    try:
        return spec, expand_grid(spec)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e
