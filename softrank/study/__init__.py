"""The generalization study: train a grid of networks, measure each on its training data, and
ask which measure ranks the models by their observed generalization gap.

* :mod:`~softrank.study.grid` — declarative grid → configurations with stable ids;
* :mod:`~softrank.study.train` — train one configuration (skorch) → one result row;
* :mod:`~softrank.study.measures` — every measure of one model (several approximations);
* :mod:`~softrank.study.store` — the incremental SQLite results table (resumable);
* :mod:`~softrank.study.runner` — run what is missing: serial, joblib or Dask;
* :mod:`~softrank.study.analysis` — Kendall τ, granulated τ, estimate/observed ratios;
* :mod:`~softrank.study.plots` — figures (matplotlib, optional).

Command line: ``python -m softrank.study run GRID.json --store results.sqlite`` (see
:func:`cli_main`).
"""
from .analysis import granulated_tau, kendall_tau, markdown_report, ratios, tau_table
from .cli import cli_main
from .grid import MeasureOptions, TrainConfig, expand_grid, load_grid
from .runner import StudyJobError, StudyRun, run_study
from .store import ResultStore, read_csv, write_csv
from .train import run_config

__all__ = ["TrainConfig", "MeasureOptions", "expand_grid", "load_grid", "ResultStore",
           "read_csv", "write_csv", "run_study", "StudyRun", "StudyJobError", "run_config",
           "kendall_tau", "tau_table", "granulated_tau", "ratios", "markdown_report",
           "cli_main"]
