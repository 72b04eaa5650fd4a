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
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

__all__ = ["TrainConfig", "MeasureOptions", "HYPERPARAMETERS", "expand_grid", "load_grid",
           "config_from_dict"]

ARCHITECTURES = ("mlp", "cnn")
OPTIMIZERS = ("adam", "sgd")
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
    products, ``hessian_iterations`` Lanczos steps). ``test_samples``: test points for α on test
    data. ``ece_bins``: equal-width confidence bins of the expected calibration error.
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

    def __post_init__(self):
        for name in ("soft_rank", "tic", "loo"):
            object.__setattr__(self, name, tuple(str(v) for v in getattr(self, name)))
        for name in ("gram_samples", "hessian_samples", "hessian_probes", "hessian_iterations",
                     "dense_max_params", "test_samples", "ece_bins", "batch_size"):
            value = getattr(self, name)
            if int(value) != value or int(value) < 1:
                raise ValueError(f"measures.{name} must be a positive integer; got {value!r}")
            object.__setattr__(self, name, int(value))
        object.__setattr__(self, "hessian", bool(self.hessian))
        object.__setattr__(self, "finish", max(0, int(self.finish)))


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
        casts = {"width": int, "depth": int, "batch_size": int, "n_train": int, "n_test": int,
                 "epochs": int, "seed": int, "data_seed": int, "weight_decay": float,
                 "lr": float, "dataset": str, "arch": str, "optimizer": str}
        for name, cast in casts.items():
            object.__setattr__(self, name, cast(getattr(self, name)))
        if isinstance(self.measures, dict):
            object.__setattr__(self, "measures", MeasureOptions(**self.measures))
        self._validate()

    def _validate(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {ARCHITECTURES}; got {self.arch!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {self.optimizer!r}")
        if not self.weight_decay > 0:
            raise ValueError(f"weight_decay must be > 0 (it is the λ of the soft rank); "
                             f"got {self.weight_decay}")
        for name in ("width", "depth", "batch_size", "n_train", "n_test", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON-ready); :func:`config_from_dict` inverts it."""
        return asdict(self)

    @property
    def id(self) -> str:
        """Stable 12-hex-digit id: SHA-1 of the canonical JSON of :meth:`to_dict`."""
        d = self.to_dict()
        if not d["measures"]["finish"]:  # ids of grids without finishing stay as they were
            del d["measures"]["finish"]
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


def _expand_block(block: dict, measures: dict) -> list[TrainConfig]:
    _check_keys(block, {"fixed", "vary"}, "block")
    fixed, vary = dict(block.get("fixed", {})), dict(block.get("vary", {}))
    _check_keys(fixed, _CONFIG_FIELDS, "fixed")
    _check_keys(vary, _CONFIG_FIELDS, "vary")
    both = sorted(set(fixed) & set(vary))
    if both:
        raise ValueError(f"{both} are both fixed and varied in one block")
    for key, values in vary.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"vary[{key!r}] must be a non-empty list; got {values!r}")
    if "dataset" not in fixed and "dataset" not in vary:
        raise ValueError("every block needs a 'dataset' (fixed or varied)")
    keys = list(vary)
    base = config_from_dict({**fixed, "measures": measures,
                             "dataset": fixed.get("dataset", vary.get("dataset", [""])[0])})
    return [replace(base, **dict(zip(keys, combo))) if keys else base
            for combo in itertools.product(*(vary[k] for k in keys))]


def expand_grid(spec: dict[str, Any]) -> list[TrainConfig]:
    """All configurations of a grid dict, in order, without duplicates (by id)."""
    if not isinstance(spec, dict):
        raise TypeError(f"a grid is a dict; got {type(spec).__name__}")
    _check_keys(spec, {"name", "measures", "blocks", "fixed", "vary"}, "grid")
    if "blocks" in spec and ({"fixed", "vary"} & set(spec)):
        raise ValueError("give either 'blocks' or a single top-level 'fixed'/'vary', not both")
    blocks = spec.get("blocks") or [{k: spec[k] for k in ("fixed", "vary") if k in spec}]
    measures = dict(spec.get("measures", {}))
    _check_keys(measures, _MEASURE_FIELDS, "measures")
    out: dict[str, TrainConfig] = {}
    for block in blocks:
        for cfg in _expand_block(block, measures):
            out.setdefault(cfg.id, cfg)
    return list(out.values())


def load_grid(path: str | Path) -> tuple[dict[str, Any], list[TrainConfig]]:
    """(grid dict, its configurations) from a JSON file."""
    text = Path(path).read_text()
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return spec, expand_grid(spec)
