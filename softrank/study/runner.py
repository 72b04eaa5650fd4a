"""Run the configurations that are not in the store yet: serially, through joblib (processes)
or on a Dask cluster; each finished model is written to the store as soon as it comes back.

Resuming is the same call again: the configurations already stored are skipped (by id), so a
run killed at any point loses only the models that were in flight and duplicates none.
Workers only compute; the calling process alone writes the store.

Each job sets torch's intra-op threads (``torch_threads``, 1 by default: with one model per
core, more threads per model only oversubscribe the machine).
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from .grid import TrainConfig
from .store import ResultStore
from .train import run_config

__all__ = ["run_study", "StudyRun", "BACKENDS", "StudyJobError"]

BACKENDS = ("serial", "joblib", "dask")

Job = Callable[..., dict[str, Any]]
Outcome = tuple[str, bool, Any]  # (config id, succeeded, row or traceback text)


class StudyJobError(RuntimeError):
    """A configuration failed (``errors='raise'``); the rows finished before it are stored."""


@dataclass
class StudyRun:
    """What one :func:`run_study` call did."""

    n_configs: int
    n_already_done: int
    n_written: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def n_pending(self) -> int:
        return self.n_configs - self.n_already_done


def _guarded(job: Job, config_id: str, config: dict, torch_threads: int | None,
             data_root: str | None) -> Outcome:
    """Run one job in a worker; failures come back as text (tracebacks need not pickle)."""
    try:
        return config_id, True, job(config, torch_threads=torch_threads, data_root=data_root)
    except Exception:
        return config_id, False, traceback.format_exc()


def _serial(pending, job, torch_threads, data_root, n_jobs, client) -> Iterator[Outcome]:
    for cfg in pending:
        yield _guarded(job, cfg.id, cfg.to_dict(), torch_threads, data_root)


def _joblib(pending, job, torch_threads, data_root, n_jobs, client) -> Iterator[Outcome]:
    from joblib import Parallel, delayed

    parallel = Parallel(n_jobs=n_jobs, backend="loky", return_as="generator_unordered")
    results = parallel(delayed(_guarded)(job, cfg.id, cfg.to_dict(), torch_threads, data_root)
                       for cfg in pending)
    try:
        yield from results
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()


def _dask_client(client, n_jobs):
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("backend='dask' needs dask.distributed: "
                          "pip install 'softrank[distributed]'") from e
    if client is None:
        workers = os.cpu_count() if n_jobs in (None, -1) else int(n_jobs)
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True)
        return Client(cluster), cluster
    if isinstance(client, str):
        return Client(client), None
    return client, False


def _dask(pending, job, torch_threads, data_root, n_jobs, client) -> Iterator[Outcome]:
    from dask.distributed import as_completed

    client, owned = _dask_client(client, n_jobs)
    futures = [client.submit(_guarded, job, cfg.id, cfg.to_dict(), torch_threads, data_root,
                             key=f"softrank-study-{cfg.id}", pure=False) for cfg in pending]
    try:
        for fut in as_completed(futures):
            yield fut.result()
    finally:
        client.cancel([f for f in futures if not f.done()])
        if owned is not False:
            client.close()
            if owned is not None:
                owned.close()


_BACKEND_RUNNERS = {"serial": _serial, "joblib": _joblib, "dask": _dask}


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="model", desc="softrank study", disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)


def _unique_pending(configs: Iterable[TrainConfig], done: set[str]) -> tuple[list, int]:
    unique = {c.id: c for c in configs}
    pending = [c for cid, c in unique.items() if cid not in done]
    return pending, len(unique)


def run_study(configs: Iterable[TrainConfig], store: ResultStore | str | os.PathLike, *,
              backend: str = "joblib", n_jobs: int = 1, client=None,
              torch_threads: int | None = 1, data_root: str | None = None,
              progress: bool = True, errors: str = "raise", job: Job = run_config) -> StudyRun:
    """Train and measure every configuration not yet in ``store``; returns a :class:`StudyRun`.

    ``backend``: 'serial', 'joblib' (``n_jobs`` processes) or 'dask' (``client``: a
    ``distributed.Client``, a scheduler address, or None for a ``LocalCluster`` of ``n_jobs``
    single-threaded worker processes). ``errors``: 'raise' stops at the first failed model
    (:class:`StudyJobError`; the rows already finished are kept), 'skip' records it and goes on
    (it is retried on the next run). ``job(config_dict, torch_threads=, data_root=)`` is the
    function run per configuration (default :func:`softrank.study.train.run_config`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip'; got {errors!r}")
    own_store = not isinstance(store, ResultStore)
    store = ResultStore(store) if own_store else store
    try:
        return _run(configs, store, backend, n_jobs, client, torch_threads, data_root,
                    progress, errors, job)
    finally:
        if own_store:
            store.close()


def _run(configs, store, backend, n_jobs, client, torch_threads, data_root, progress, errors,
         job) -> StudyRun:
    start = time.perf_counter()
    pending, total = _unique_pending(configs, store.done_ids())
    summary = StudyRun(n_configs=total, n_already_done=total - len(pending))
    by_id = {c.id: c for c in pending}
    bar = _progress_bar(len(pending), progress)
    outcomes = _BACKEND_RUNNERS[backend](pending, job, torch_threads, data_root, n_jobs, client)
    try:
        for config_id, ok, payload in outcomes:
            if ok:
                summary.n_written += store.add(config_id, by_id[config_id].to_dict(), payload)
            else:
                summary.failures[config_id] = payload
                bar.write(f"softrank study: configuration {config_id} failed:\n{payload}")
                if errors == "raise":
                    raise StudyJobError(f"configuration {config_id} failed; "
                                        f"{summary.n_written} rows written this run:\n{payload}")
            bar.update(1)
            bar.set_postfix_str(config_id)
    finally:
        outcomes.close()
        bar.close()
        summary.seconds = time.perf_counter() - start
    return summary
