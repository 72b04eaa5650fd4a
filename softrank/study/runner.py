"""Run the configurations that are not in the store yet: serially, through joblib (processes)
or on a Dask cluster; each finished model is written to the store as soon as it comes back.

Resuming is the same call again: the configurations already stored are skipped (by id), so a
run killed at any point loses only the models that were in flight and duplicates none.
Workers only compute; the calling process alone writes the store.

Each job sets torch's intra-op threads (``torch_threads``, 1 by default: with one model per
core, more threads per model only oversubscribe the machine).

Failures of the machinery, not of the model:

* a worker process that dies (``kill -9``, the kernel's out-of-memory killer, a crash in native
  code) takes the models running in it down; each of them is run again, alone, and the one that
  kills its worker a second time is recorded as a failed configuration (``errors='skip'`` goes
  on; ``'raise'`` stops with :class:`StudyJobError`), never aborting the other models;
* a worker whose driver process dies (``kill -9`` of the run) exits within a second
  (a watchdog thread compares its parent process with the driver's) instead of computing
  models nobody will store.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback
import warnings
from collections import deque
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
    """A configuration failed (``errors='raise'``); the rows finished before it are stored.

    The message is one line (the error that ended the job and what to do); ``details`` holds
    the job's full traceback text and ``config_id`` the configuration."""

    def __init__(self, message: str, config_id: str | None = None, details: str = ""):
        super().__init__(message)
        self.config_id = config_id
        self.details = details


def _last_line(text: str) -> str:
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "unknown error"


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


_WATCHDOG_PERIOD = 0.5  # seconds between two checks of the parent process
_watching: set[int] = set()


def _exit_with_parent(driver_pid: int) -> None:
    """In a worker that is a direct child of the driver: exit as soon as the driver is gone
    (its parent process changes), instead of computing for nobody. One thread per process."""
    if os.getpid() == driver_pid or os.getppid() != driver_pid or driver_pid in _watching:
        return  # the driver itself (serial), a worker of a worker (dask nanny), or watched
    _watching.add(driver_pid)

    def watch():
        while True:
            time.sleep(_WATCHDOG_PERIOD)
            if os.getppid() != driver_pid:
                os._exit(70)  # EX_SOFTWARE: the driver died; nothing would store the result

    threading.Thread(target=watch, name="softrank-study-watchdog", daemon=True).start()


def _guarded(job: Job, config_id: str, config: dict, torch_threads: int | None,
             data_root: str | None, driver_pid: int | None = None) -> Outcome:
    """Run one job in a worker; failures come back as text (tracebacks need not pickle)."""
    if driver_pid is not None:
        _exit_with_parent(driver_pid)
    try:
        return config_id, True, job(config, torch_threads=torch_threads, data_root=data_root)
    except Exception:
        return config_id, False, traceback.format_exc()


def _serial(pending, job, torch_threads, data_root, n_jobs, client) -> Iterator[Outcome]:
    for cfg in pending:
        yield _guarded(job, cfg.id, cfg.to_dict(), torch_threads, data_root)


def _n_workers(n_jobs) -> int:
    """joblib's convention: n_jobs < 0 means cpu_count + 1 + n_jobs (-1: all cores)."""
    cpus = os.cpu_count() or 1
    if n_jobs is None:
        return 1
    n = int(n_jobs)
    return max(1, cpus + 1 + n if n < 0 else n)


def _died(config_id: str, error: BaseException) -> Outcome:
    return config_id, False, (
        f"the worker process running configuration {config_id} died twice (killed by a "
        f"signal, by the out-of-memory killer, or a crash in native code): {error}\n"
        "WorkerDiedError: the worker process running this configuration died twice")


def _joblib(pending, job, torch_threads, data_root, n_jobs, client) -> Iterator[Outcome]:
    """joblib's process pool (loky), scheduled here: at most ``n_jobs`` models in flight, and a
    dead worker costs only the models it was running (see the module docstring)."""
    from concurrent.futures import FIRST_COMPLETED, wait

    from joblib.externals.loky import ProcessPoolExecutor
    from joblib.externals.loky.process_executor import BrokenProcessPool

    n = _n_workers(n_jobs)
    driver = os.getpid()
    queue, suspects = deque(pending), deque()
    deaths: dict[str, int] = {}
    running: dict = {}  # future -> config
    executor = None

    def next_config():
        if any(c.id in deaths for c in running.values()):
            return None  # a suspect runs alone
        if suspects:
            return None if running else suspects.popleft()
        return queue.popleft() if queue and len(running) < n else None

    try:
        while queue or suspects or running:
            if executor is None:
                executor = ProcessPoolExecutor(max_workers=n)
            while (cfg := next_config()) is not None:
                running[executor.submit(_guarded, job, cfg.id, cfg.to_dict(), torch_threads,
                                        data_root, driver)] = cfg
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                cfg = running.pop(fut)
                try:
                    outcome = fut.result()
                except BrokenProcessPool as e:  # its worker (or a neighbour's) died
                    executor = None  # broken for good: the next round starts a new pool
                    deaths[cfg.id] = deaths.get(cfg.id, 0) + 1
                    if deaths[cfg.id] < 2:
                        suspects.append(cfg)
                        continue
                    outcome = _died(cfg.id, e)
                yield outcome
    finally:
        for fut in running:
            fut.cancel()
        if executor is not None:
            executor.shutdown(wait=False, kill_workers=bool(running))


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
    damaged = store.damaged_ids()
    if damaged:  # unreadable rows: compute those configurations again
        warnings.warn(f"{store.path}: {len(damaged)} stored row(s) cannot be read and will be "
                      f"computed again: {damaged[:5]}", RuntimeWarning, stacklevel=3)
        store.remove(damaged)
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
                    raise StudyJobError(
                        f"configuration {config_id} failed ({_last_line(payload)}); "
                        f"{summary.n_written} rows written this run. Run again to resume, with "
                        "--errors skip (errors='skip') to record failures and go on",
                        config_id, payload)
            bar.update(1)
            bar.set_postfix_str(config_id)
    finally:
        outcomes.close()
        bar.close()
        summary.seconds = time.perf_counter() - start
    return summary
