"""Shared helpers for the benchmark scripts in ``benchmarks/``.

* :func:`add_common_args` — ``--data``, ``--device``, ``--threads``, ``--seed``;
* :func:`load_mnist` — MNIST from ``../shared/data/mnist/mnist.npz`` (relative to the
  repository root) or ``--data PATH``, as flat float32 images normalised with the training-set
  mean/std and int64 labels;
* :func:`mlp` — the 784-512-512-10 ReLU MLP of the speed targets (issue 2);
* :func:`train_epoch` / :func:`train` — one epoch of forward + backward + optimizer step;
* :func:`timed` / :func:`sync` — wall time with ``time.perf_counter`` (CUDA synchronised);
* :func:`peak_rss_bytes` / :func:`run_worker` — peak memory of a configuration measured in a
  subprocess of its own (Linux ``VmHWM``, else ``ru_maxrss``), so that one configuration's
  allocations do not pollute another's numbers.

A worker is the same script re-run with ``--worker NAME``; it prints one JSON line
(``RESULT_TAG`` + json) that :func:`run_worker` parses, adding the child's peak RSS as the
parent sees it (``resource.getrusage(RUSAGE_CHILDREN)`` after the child exited).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MNIST = REPO_ROOT.parent / "shared" / "data" / "mnist" / "mnist.npz"
RESULT_TAG = "@@RESULT@@ "
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


# -- arguments -----------------------------------------------------------------------------
def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--data", type=Path, default=DEFAULT_MNIST,
                        help="path to mnist.npz (default: ../shared/data/mnist/mnist.npz from "
                             "the repository root)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def setup_torch(threads: int, seed: int = 0) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)


def child_env(threads: int) -> dict:
    """Environment for a worker subprocess: same thread count for OpenMP/MKL as for torch."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


# -- data and model ------------------------------------------------------------------------
def load_mnist(path: Path = DEFAULT_MNIST, n: int | None = None, split: str = "train"):
    """First ``n`` images of a split as (X float32 (n, 784), y int64 (n,)), normalised."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"MNIST not found at {path}; pass --data PATH/mnist.npz")
    with np.load(path) as d:
        x, y = d[f"x_{split}"], d[f"y_{split}"]
    if n is not None:
        x, y = x[:n], y[:n]
    X = (x.reshape(len(x), -1).astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD
    return torch.from_numpy(X), torch.from_numpy(y.astype(np.int64))


def mlp(widths=(784, 512, 512, 10), seed: int = 0) -> nn.Sequential:
    """ReLU MLP with the given layer widths (default 784-512-512-10), float32."""
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_optimizer(model: nn.Module, weight_decay: float, lr: float = 1e-3):
    """Adam with L2 weight decay: objective mean loss + ½·wd·‖θ‖² (SPEC §2: Λ = wd)."""
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


def train_epoch(model, opt, X, y, batch_size: int, generator: torch.Generator,
                device: str = "cpu") -> None:
    """One shuffled epoch: forward, mean cross-entropy, backward, optimizer step per batch."""
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    perm = torch.randperm(len(X), generator=generator)
    for start in range(0, len(X), batch_size):
        idx = perm[start:start + batch_size]
        xb, yb = X[idx].to(device), y[idx].to(device)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(xb), yb).backward()
        opt.step()


def train(model, X, y, *, epochs: int, batch_size: int, weight_decay: float, seed: int = 0,
          device: str = "cpu"):
    opt = make_optimizer(model, weight_decay)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        train_epoch(model, opt, X, y, batch_size, gen, device)
    model.eval()
    return model


@torch.no_grad()
def accuracy(model, X, y, device="cpu") -> float:
    model.eval()
    return float((model(X.to(device)).argmax(1).cpu() == y).float().mean())


# -- timing --------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str = "cpu", repeats: int = 1):
    """(fastest wall seconds over ``repeats`` calls, last result) with time.perf_counter."""
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times), out


def timed_cpu(fn, device: str = "cpu"):
    """(wall seconds, CPU seconds of this process, result): CPU time is the robust measure when
    other processes compete for the cores (it still counts OpenMP spin-waiting)."""
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, out


def load_average() -> str:
    """1/5/15-minute load averages (other work on the machine skews wall times)."""
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# -- memory --------------------------------------------------------------------------------
def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    """Current resident set size (Linux), or None."""
    return _proc_status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM, else ru_maxrss (KiB on Linux)."""
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: ``/proc/self/clear_refs``), so that
    a later :func:`peak_rss_bytes` measures from now on and not the transients of, e.g., data
    loading before it; False where that is not possible (the peak then includes them)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def device_peak_bytes(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device == "cuda" else None


def emit(result: dict) -> None:
    """Worker side: print the result line the parent parses."""
    result.setdefault("peak_rss_bytes", peak_rss_bytes())
    print(RESULT_TAG + json.dumps(result), flush=True)


@contextlib.contextmanager
def saved_state(model):
    """Path of a temporary file holding ``model``'s state dict (on the CPU) for workers to
    load; removed on exit."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, path)
        yield path


def run_worker(script: Path, args: list[str], threads: int, echo: bool = False) -> dict:
    """Run ``python script *args`` in a fresh process; return its result dict plus
    ``children_maxrss_bytes`` (RUSAGE_CHILDREN, a max over all children so far)."""
    cmd = [sys.executable, str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(threads))
    if echo or proc.returncode != 0:
        sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if not lines:
        raise RuntimeError(f"worker printed no result: {' '.join(cmd)}\n{proc.stdout}")
    result = json.loads(lines[-1][len(RESULT_TAG):])
    result["stdout"] = "\n".join(ln for ln in proc.stdout.splitlines()
                                 if not ln.startswith(RESULT_TAG))
    ru = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["children_maxrss_bytes"] = ru if sys.platform == "darwin" else ru * 1024
    return result


# -- formatting ----------------------------------------------------------------------------
def gib(b: float | None) -> str:
    return "—" if b is None else f"{b / 2 ** 30:.2f} GiB"


def table(rows: list[list], header: list[str]) -> str:
    """A GitHub-markdown table."""
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(cells[0]), sep] + [fmt(r) for r in cells[1:]])
