"""Model selection without a validation split: softrank's in-sample selectors against 5-fold
cross-validation, an 80/20 holdout and the oracle, on the same trained candidates.

One command reruns everything (resumable: rows already in ``--out`` are kept and their
(task, seed) pairs skipped)::

    python benchmarks/bench_selection.py --out benchmarks/results/selection.csv
    python benchmarks/bench_selection.py --out benchmarks/results/selection.csv --report docs/selection

Times are CPU seconds of the (single-threaded) process, ``time.process_time``: the wall time on
an idle core, and unaffected by other jobs on a shared machine. ``--report DIR`` writes the summary tables (``DIR/summary.md``) and the figures
(``DIR/regret_by_task.png``, ``DIR/regret_vs_time.png``) from the CSV and copies the CSV to
``DIR/selection.csv``.

Tasks (all offline): scikit-learn digits (n = 500), MNIST and Fashion-MNIST subsets
(n = 500 and n = 2,000; MNIST n = 500 also searches MLP vs CNN), scikit-learn diabetes
(regression, MSELoss), breast cancer (binary, BCEWithLogitsLoss) and a teacher–student task
whose Bayes risk is known. Grid: weight decay {1e-5, 1e-4, 1e-3, 1e-2, 1e-1} × width {16, 64}.
Each seed draws the data subset and the initialization. Training: Adam, lr 1e-2, batch 64
(128 at n = 2,000), 15 epochs (8 at n = 2,000): 100–130 optimizer steps, sized so that the
whole benchmark runs on one shared CPU core.
"""
from __future__ import annotations

import argparse
import csv
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from softrank.datasets import load_dataset, make_teacher_student  # noqa: E402
from softrank.selection import BASELINES, SELECTORS, compare_selectors  # noqa: E402

DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
WEIGHT_DECAYS = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
WIDTHS = [16, 64]
#: finished variants run (finishing each candidate costs up to 500 full-batch L-BFGS steps,
#: more than training it: only these)
FINISHED = ("SoftRankFIM kfac, α·rank/n", "ApproxLOO kfac", "ApproxLOO exact")
#: measured as trained with the effective Λ as well (lam='effective')
EFFECTIVE = ("SoftRankFIM kfac, α·rank/n", "SoftRankFIM kfac, rank/n", "ApproxLOO kfac",
             "ApproxLOO exact")
DEFAULT_SELECTORS = ([n for n, s in SELECTORS.items() if not s.finish and not s.effective]
                     + [f"{n}, finished" for n in FINISHED if f"{n}, finished" in SELECTORS]
                     + [f"{n}, effective Λ" for n in EFFECTIVE])
COLUMNS = ["task", "seed", "selector", "chosen", "params", "test_loss", "oracle_test_loss",
           "regret", "picked_oracle", "time_s", "grid_time_s", "time_rel", "n_train",
           "n_candidates", "bayes_risk"]


# -- models --------------------------------------------------------------------------------------
class MLP(nn.Module):
    """``in → hidden (ReLU) → out`` on flattened inputs."""

    def __init__(self, n_in: int = 64, hidden: int = 16, n_out: int = 10):
        super().__init__()
        self.hidden = nn.Linear(n_in, hidden)
        self.out = nn.Linear(hidden, n_out)

    def forward(self, X):
        z = self.out(torch.relu(self.hidden(X.reshape(len(X), -1))))
        return z.squeeze(-1) if self.out.out_features == 1 and z.ndim == 2 else z


class MLPRegression(MLP):
    """:class:`MLP` with a ``(N, 1)`` output (skorch's regressor keeps the target 2-D)."""

    def forward(self, X):
        return self.out(torch.relu(self.hidden(X)))


class CNN(nn.Module):
    """28×28 images: conv 5×5 stride 2 (``hidden`` / 2 channels) → ReLU → conv 3×3 stride 2
    (``hidden`` channels) → ReLU → linear; ``hidden`` plays the role of the MLP's width."""

    def __init__(self, n_in: int = 784, hidden: int = 16, n_out: int = 10):
        super().__init__()
        c = max(hidden // 2, 1)
        self.conv1 = nn.Conv2d(1, c, 5, stride=2)          # 28 → 12
        self.conv2 = nn.Conv2d(c, hidden, 3, stride=2)     # 12 → 5
        self.out = nn.Linear(hidden * 25, n_out)

    def forward(self, X):
        h = torch.relu(self.conv1(X.reshape(len(X), 1, 28, 28)))
        h = torch.relu(self.conv2(h))
        return self.out(h.flatten(1))


# -- tasks ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """A data set, a net and a grid. ``load(seed)`` -> (X, y, X_test, y_test, bayes_risk)."""

    name: str
    load: Callable[[int], tuple]
    kind: str          # 'classifier', 'binary', 'regressor'
    n_in: int
    n_out: int
    batch_size: int = 64
    max_epochs: int = 15
    cnn: bool = False

    def net(self):
        from skorch import NeuralNetBinaryClassifier, NeuralNetClassifier, NeuralNetRegressor

        common = dict(module=MLP, module__n_in=self.n_in, module__n_out=self.n_out,
                      optimizer=torch.optim.Adam, lr=1e-2, batch_size=self.batch_size,
                      max_epochs=self.max_epochs, train_split=None, verbose=0)
        if self.kind == "classifier":
            return NeuralNetClassifier(criterion=nn.CrossEntropyLoss, **common)
        if self.kind == "binary":
            return NeuralNetBinaryClassifier(criterion=nn.BCEWithLogitsLoss, **common)
        common["module"] = MLPRegression
        return NeuralNetRegressor(criterion=nn.MSELoss, **common)

    def grid(self):
        grid = {"module__hidden": WIDTHS, "optimizer__weight_decay": WEIGHT_DECAYS}
        if self.cnn:
            grid["module"] = [MLP, CNN]
        return grid


def _image_loader(name: str, n: int, n_test: int = 1000):
    def load(seed):
        d = load_dataset(name, root=DATA_ROOT / name, n_train=n, n_test=n_test,
                         random_state=seed, download=False)
        return d.X_train, d.y_train, d.X_test, d.y_test, math.nan
    return load


def _digits(n: int):
    def load(seed):
        from sklearn.model_selection import train_test_split
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        X_tr, X_te, y_tr, y_te = train_test_split(
            (X / 16.0).astype(np.float32), y.astype(np.int64), train_size=n,
            random_state=seed, stratify=y)
        return X_tr, y_tr, X_te, y_te, math.nan
    return load


def _tabular(loader, n: int, regression: bool):
    def load(seed):
        from sklearn.model_selection import train_test_split
        from sklearn.preprocessing import StandardScaler

        X, y = loader(return_X_y=True)
        X_tr, X_te, y_tr, y_te = train_test_split(
            X, y, train_size=n, random_state=seed, stratify=None if regression else y)
        scaler = StandardScaler().fit(X_tr)
        X_tr, X_te = (scaler.transform(a).astype(np.float32) for a in (X_tr, X_te))
        if regression:  # standardized target: the MSE is in units of the target's variance
            mu, sd = y_tr.mean(), y_tr.std()
            y_tr, y_te = (((a - mu) / sd).astype(np.float32).reshape(-1, 1) for a in (y_tr, y_te))
        else:
            # skorch's binary classifier takes float {0, 1} targets (BCEWithLogitsLoss)
            y_tr, y_te = y_tr.astype(np.float32), y_te.astype(np.float32)
        return X_tr, y_tr, X_te, y_te, math.nan
    return load


def _teacher(n: int):
    def load(seed):
        d = make_teacher_student(n_train=n, n_test=2000, n_features=20, n_classes=10,
                                 hidden=32, temperature=1.0, random_state=seed)
        return d.X_train, d.y_train, d.X_test, d.y_test, d.teacher.bayes_log_loss(d.X_test)
    return load


def tasks() -> dict[str, Task]:
    from sklearn.datasets import load_breast_cancer, load_diabetes

    out = [
        Task("digits n=500", _digits(500), "classifier", 64, 10),
        Task("teacher-student n=500", _teacher(500), "classifier", 20, 10),
        Task("breast cancer n=400", _tabular(load_breast_cancer, 400, False), "binary", 30, 1),
        Task("diabetes n=300", _tabular(load_diabetes, 300, True), "regressor", 10, 1),
        Task("MNIST n=500, MLP vs CNN", _image_loader("mnist", 500), "classifier", 784, 10,
             cnn=True),
        Task("Fashion-MNIST n=500", _image_loader("fashion_mnist", 500), "classifier", 784, 10),
        Task("MNIST n=2000", _image_loader("mnist", 2000), "classifier", 784, 10,
             batch_size=128, max_epochs=8),
        Task("Fashion-MNIST n=2000", _image_loader("fashion_mnist", 2000), "classifier", 784,
             10, batch_size=128, max_epochs=8),
    ]
    return {t.name: t for t in out}


def tiny_task() -> Task:
    """Seconds: digits n = 120, 3 epochs (the test's task)."""
    return Task("digits tiny", _digits(120), "classifier", 64, 10, batch_size=32, max_epochs=3)


# -- running -------------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_rows(path: Path, rows: list[dict]) -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerows(rows)


def expected_selectors(task: Task, selectors) -> list[str]:
    """In-sample selectors that run on this task (exact ones only on small candidates)."""
    from softrank.selection import selectors_available

    n = int(task.name.split("n=")[1].split(",")[0]) if "n=" in task.name else 120
    n_params = max(_params(task, h) for h in WIDTHS)
    return selectors_available(n, task.n_out, n_params, selectors)


def _params(task: Task, hidden: int) -> int:
    mlp = hidden * (task.n_in + 1) + task.n_out * (hidden + 1)
    if not task.cnn:
        return mlp
    c = max(hidden // 2, 1)
    return max(mlp, c * 26 + hidden * (9 * c + 1) + task.n_out * (hidden * 25 + 1))


def run_task(task: Task, seed: int, out: Path, selectors, done: set[str], log=print) -> None:
    X, y, X_test, y_test, bayes = task.load(seed)
    names = [s for s in expected_selectors(task, selectors)]
    t0 = time.perf_counter()
    result = compare_selectors(task.net(), task.grid(), X, y, X_test, y_test,
                               selectors=names, random_state=seed, skip=done,
                               timer=time.process_time,
                               progress=lambda s: log(f"  {task.name} seed {seed}: {s}"))
    oracle = float(result.test_loss[result.oracle])
    rows = [{**{k: r[k] for k in ("selector", "chosen", "params", "test_loss", "regret",
                                  "picked_oracle", "time_s", "time_rel")},
             "task": task.name, "seed": seed, "oracle_test_loss": oracle,
             "grid_time_s": result.grid_time, "n_train": len(X),
             "n_candidates": len(result.candidates), "bayes_risk": bayes}
            for r in result.rows]
    append_rows(out, rows)
    log(f"{task.name} seed {seed}: {len(rows)} rows in {time.perf_counter() - t0:.0f} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks/results/selection.csv")
    p.add_argument("--tasks", nargs="*", default=None,
                   help="task names (default: all); 'tiny' = a seconds-long digits task")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--selectors", nargs="*", default=DEFAULT_SELECTORS,
                   help="in-sample selectors (default: every one on nets as trained, and "
                        f"{FINISHED} finished; the exact ones only where they fit): "
                        f"{list(SELECTORS)}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report", type=Path, default=None,
                   help="write summary.md, the figures and selection.csv into this folder")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    all_tasks = tasks()
    if args.tasks == ["tiny"]:
        chosen = [tiny_task()]
    else:
        names = args.tasks or list(all_tasks)
        unknown = [n for n in names if n not in all_tasks]
        if unknown:
            p.error(f"unknown tasks {unknown}; valid: {list(all_tasks)} or 'tiny'")
        chosen = [all_tasks[n] for n in names]
    stored = read_rows(args.out)
    for seed in args.seeds:           # seed-major: every task gets seed 0 before seed 1
        for task in chosen:
            done = {r["selector"] for r in stored
                    if r["task"] == task.name and int(r["seed"]) == seed}
            wanted = set(expected_selectors(task, args.selectors)) | set(BASELINES)
            if wanted <= done:
                continue
            run_task(task, seed, args.out, args.selectors, done)
    if args.report is not None:
        write_report(args.out, args.report)
    return 0


# -- report --------------------------------------------------------------------------------------
def summarize(rows: list[dict]) -> tuple[dict, list[str]]:
    """{(task, selector): stats} plus the task order; 'all tasks' pools every (task, seed).

    stats: ``mean`` and ``worst`` regret over seeds, ``oracle`` (fraction of seeds on which the
    selector chose the oracle's candidate), ``time_rel`` (mean time / grid time), ``seeds``."""
    from collections import defaultdict

    groups = defaultdict(list)
    for r in rows:
        for task in (r["task"], "all tasks"):
            groups[task, r["selector"]].append(r)
    stats = {}
    for key, g in groups.items():
        regret = np.array([float(r["regret"]) for r in g])
        stats[key] = {"mean": regret.mean(), "worst": regret.max(),
                      "oracle": np.mean([str(r["picked_oracle"]) in ("True", "1", "true")
                                         for r in g]),
                      "time_rel": np.mean([float(r["time_rel"]) for r in g]), "seeds": len(g)}
    tasks_in = list(dict.fromkeys(r["task"] for r in rows))
    return stats, tasks_in + ["all tasks"]


def _order(stats) -> list[str]:
    sels = {s for _, s in stats}
    insample = [s for s in SELECTORS if s in sels]
    return [s for s in BASELINES if s in sels and s != "oracle"] + insample


def format_summary(stats, task_names) -> str:
    lines = []
    for task in task_names:
        lines += [f"### {task}", "",
                  "| selector | mean regret | worst regret | picks the oracle's | time / grid |",
                  "|---|---|---|---|---|"]
        for sel in _order(stats):
            if (task, sel) not in stats:
                continue
            st = stats[task, sel]
            lines.append(f"| {sel} | {st['mean']:.4f} | {st['worst']:.4f} | "
                         f"{st['oracle']:.0%} | {st['time_rel']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def format_overview(stats, task_names) -> str:
    """Two Markdown tables: every selector over all tasks (with its time as a fraction of
    5-fold CV's), and its mean regret per task."""
    cv = stats.get(("all tasks", "5-fold CV"), {}).get("time_rel", np.nan)
    lines = ["| selector | mean regret | worst regret | picks the oracle's | time / grid "
             "| time / 5-fold CV |", "|---|---|---|---|---|---|"]
    for sel in _order(stats):
        st = stats.get(("all tasks", sel))
        if st is not None:
            lines.append(f"| {sel} | {st['mean']:.4f} | {st['worst']:.4f} | "
                         f"{st['oracle']:.0%} | {st['time_rel']:.2f} | "
                         f"{st['time_rel'] / cv:.2f} |")
    tasks_only = [t for t in task_names if t != "all tasks"]
    lines += ["", "| selector | " + " | ".join(tasks_only) + " |",
              "|---|" + "---|" * len(tasks_only)]
    for sel in _order(stats):
        cells = [f"{stats[t, sel]['mean']:.4f}" if (t, sel) in stats else "—"
                 for t in tasks_only]
        lines.append(f"| {sel} | " + " | ".join(cells) + " |")
    seeds = {t: stats.get((t, "oracle"), {}).get("seeds", 0) for t in tasks_only}
    lines += ["", "Seeds per task: " + ", ".join(f"{t} {k}" for t, k in seeds.items()) + "."]
    return "\n".join(lines)


def plot_regret_by_task(stats, task_names, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sels = _order(stats)
    tasks_only = [t for t in task_names if t != "all tasks"]
    fig, ax = plt.subplots(figsize=(14, 0.45 * len(sels) * len(tasks_only) / 3 + 4))
    height = 0.8 / len(tasks_only)
    cmap = plt.get_cmap("tab10")
    for j, task in enumerate(tasks_only):
        vals = [stats.get((task, s), {}).get("mean", np.nan) for s in sels]
        ax.barh(np.arange(len(sels)) + j * height, vals, height, label=task, color=cmap(j % 10))
    ax.set_yticks(np.arange(len(sels)) + 0.4 - height / 2)
    ax.set_yticklabels(sels, fontsize=13)
    ax.invert_yaxis()
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("mean regret over seeds (test loss − oracle's)", fontsize=14)
    ax.tick_params(axis="x", labelsize=12)
    ax.legend(fontsize=11, loc="lower right")
    ax.set_title("Regret of each selector, per task", fontsize=16)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_regret_vs_time(stats, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 8))
    for sel in _order(stats):
        st = stats.get(("all tasks", sel))
        if st is None or not np.isfinite(st["time_rel"]):
            continue
        base = sel in BASELINES
        ax.scatter(st["time_rel"], st["mean"], s=120, marker="s" if base else "o",
                   color="tab:red" if base else "tab:blue")
        ax.annotate(sel, (st["time_rel"], st["mean"]), fontsize=11, xytext=(6, 4),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("CPU time / time to train the grid once", fontsize=14)
    ax.set_ylabel("mean regret over tasks and seeds", fontsize=14)
    ax.tick_params(labelsize=12)
    ax.set_title("Regret against time (blue: softrank in-sample, red: baselines)", fontsize=15)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(csv_path: Path, folder: Path) -> None:
    """summary.md, regret_by_task.png, regret_vs_time.png and selection.csv in ``folder``."""
    rows = read_rows(csv_path)
    folder.mkdir(parents=True, exist_ok=True)
    stats, task_names = summarize(rows)
    (folder / "summary.md").write_text(format_overview(stats, task_names) + "\n\n"
                                       + format_summary(stats, task_names))
    plot_regret_by_task(stats, task_names, folder / "regret_by_task.png")
    plot_regret_vs_time(stats, folder / "regret_vs_time.png")
    if csv_path.resolve() != (folder / "selection.csv").resolve():
        shutil.copyfile(csv_path, folder / "selection.csv")
    print(format_overview(stats, task_names))


if __name__ == "__main__":
    sys.exit(main())
