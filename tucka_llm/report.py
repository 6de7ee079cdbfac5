"""``tucka report``: one Markdown table and PNG plots that compare training runs and their evaluations.

A training run is ``tucka train``'s output directory (``run_config.json``, ``metrics.jsonl``, the adapter); an
evaluation is ``tucka eval``'s output directory (``summary.json``); ``layout`` reads both. An evaluation joins
its run's row through the adapter it evaluated, or through the merged checkpoint's ``tucka_export.json``; any other
evaluation (a base model, a run not given) gets a row of its own, named after what it evaluated.

About 450 lines, kept in one module on purpose: the table and the plots are two views of the same records (one row
per run, the same labels, the same routing windows), and a change to one is nearly always a change to the other.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from safetensors import SafetensorError, safe_open

from tucka_llm.errors import TuckaError
from tucka_llm.io.atomic import atomic_write, atomic_write_text
from tucka_llm.layout import (
    ADAPTER_WEIGHTS,
    HELD_OUT_LOSS,
    REPORT,
    RUN_CONFIG,
    SUMMARY,
    exported_from,
    read_json,
    read_metrics,
)

# The file names the writers use (tucka_llm.training.run, tucka_llm.eval.run, tucka_llm.export.merge); not imported
# from there because those modules load transformers, datasets and peft, which a report does not need.

MISSING = "–"
METHOD_NAMES = {"tucka": "TuckA", "lora": "LoRA", "dora": "DoRA"}
TASKS = ("gsm8k", "math")  # summary.json's "task", in the order of the table's accuracy columns
DATA_NAMES = {"math500": "MATH-500"}  # data other than the task's own test set, as the accuracy cell names it
COLUMNS = (
    "run",
    "method",
    "trainable params",
    "tokens/s",
    "peak memory (GB)",
    "GSM8K",
    "MATH",
    "held-out loss",
    "routing (whole run)",
    "wall time",
)
EXPERT_LOAD_KEY = re.compile(r"expert_load/group(\d+)")
ROLLING_ROUTES = 64  # the rolling window of the routing plots, in routes (micro-batches)
DPI = 120


class ReportError(TuckaError):
    """An argument that is not a readable training run or evaluation; the message says which and what is expected."""

    exit_status = 2  # a bad argument, as argparse exits


@dataclass(frozen=True)
class Run:
    """A training run: its directory, ``run_config.json``, the records of ``metrics.jsonl`` and the adapter size."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    trainable_params: int | None


@dataclass(frozen=True)
class Evaluation:
    """An evaluation output directory and its ``summary.json``."""

    path: Path
    summary: dict[str, Any]
    held_out: dict[str, Any] | None = None  # held_out_loss.json, when ``tucka loss`` wrote one


@dataclass
class Row:
    """One line of the table: a training run with its evaluations, or evaluations of a model no given run made."""

    key: Path  # the run directory, or the evaluated adapter or model
    run: Run | None = None
    evaluations: list[Evaluation] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------ reading
def load_directory(path: Path) -> Run | Evaluation:
    """Read a training run (it has ``run_config.json``) or an evaluation output (it has ``summary.json``)."""
    if (path / RUN_CONFIG).is_file():
        return Run(path, read_json(path / RUN_CONFIG), read_metrics(path), trainable_parameters(path))
    if (path / SUMMARY).is_file():
        summary = read_json(path / SUMMARY)
        if summary.get("task") not in TASKS:
            raise ReportError(f"{path / SUMMARY} has task {summary.get('task')!r}; expected one of {list(TASKS)}")
        held_out = read_json(path / HELD_OUT_LOSS) if (path / HELD_OUT_LOSS).is_file() else None
        return Evaluation(path, summary, held_out)
    what = "is not a directory" if not path.is_dir() else f"has neither {RUN_CONFIG} nor {SUMMARY}"
    raise ReportError(
        f"{path} {what}; expected a training run directory (tucka train's output, with {RUN_CONFIG}) or an "
        f"evaluation output directory (tucka eval's, with {SUMMARY})"
    )


# Saved with a TuckA adapter but never trained: its router's buffers (e_bar, the calibration flag; tucka_center is
# e_bar's name in adapters of tucka-llm 0.2).
FROZEN_ADAPTER_TENSORS = ("tucka_router.center", "tucka_router.calibrated", "tucka_center")


def trainable_parameters(run_dir: Path) -> int | None:
    """Elements of the trained tensors in the final adapter (all but FROZEN_ADAPTER_TENSORS), read from the
    safetensors header; None before the run ends."""
    path = run_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as weights:
            names = [name for name in weights.keys() if not any(f in name for f in FROZEN_ADAPTER_TENSORS)]  # noqa: SIM118
            return sum(math.prod(weights.get_slice(name).get_shape()) for name in names)
    except (OSError, SafetensorError) as error:
        raise ReportError(f"cannot read {path}: {error}") from None


# ------------------------------------------------------------------------------------------------------ linking
def build_rows(items: list[Run | Evaluation]) -> list[Row]:
    """One row per run and one per evaluated model that no given run made, in the order the arguments name them."""
    runs = {item.path.resolve() for item in items if isinstance(item, Run)}
    rows: dict[Path, Row] = {}
    for item in items:
        if isinstance(item, Run):
            rows.setdefault(item.path.resolve(), Row(item.path.resolve())).run = item
            continue
        run = trained_by(item.summary)
        key = run if run in runs else evaluated_path(item.summary)
        rows.setdefault(key, Row(key)).evaluations.append(item)
    return list(rows.values())


def trained_by(summary: dict[str, Any]) -> Path | None:
    """The training run an evaluation measured: the adapter it loaded, or the run its merged checkpoint was exported
    from (``layout.exported_from``); None for a model no run of ours made."""
    if summary.get("adapter"):
        return Path(summary["adapter"]).resolve()
    return exported_from(Path(str(summary.get("model", ""))))


def evaluated_path(summary: dict[str, Any]) -> Path:
    """What an evaluation measured, for a row of its own: the adapter it loaded, else the model (maybe a hub id)."""
    evaluated = Path(str(summary.get("adapter") or summary.get("model", "")))
    return evaluated.resolve() if evaluated.exists() else evaluated


def row_labels(rows: list[Row]) -> list[str]:
    """Directory names, with the parent's name in front where two rows share one."""
    names = [row.key.name for row in rows]
    return [f"{row.key.parent.name}/{row.key.name}" if names.count(row.key.name) > 1 else row.key.name for row in rows]


# ------------------------------------------------------------------------------------------------------ the table
def method_label(options: dict[str, Any]) -> str:
    """``TuckA r16 k4``, ``LoRA r32`` or ``DoRA r32`` from a run's recorded options."""
    method = options.get("method")
    name = METHOD_NAMES.get(method, str(method or MISSING))
    if method == "tucka":
        return f"{name} r{options.get('r', '?')} k{options.get('k', '?')}"
    if method in METHOD_NAMES:
        return f"{name} r{options.get('lora_r', '?')}"
    return name


def series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """Steps and values of ``key`` over the records that have both as finite numbers."""
    pairs = [(r.get("step"), r.get(key)) for r in records]
    pairs = [(s, v) for s, v in pairs if _is_number(s) and _is_number(v)]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def median_tokens_per_s(records: list[dict[str, Any]]) -> float | None:
    """Median training throughput over the logged steps (the first log has none)."""
    values = series(records, "tokens_per_s")[1]
    return statistics.median(values) if values else None


def peak_memory_gb(records: list[dict[str, Any]]) -> float | None:
    """The largest peak memory any rank reached, in GiB."""
    values = series(records, "peak_memory_gb")[1]
    return max(values) if values else None


def wall_seconds(records: list[dict[str, Any]]) -> float | None:
    """Training wall time: from the first log to the last, plus the time before the first log."""
    times = [r for r in records if _is_number(r.get("time"))]
    if not times:
        return None
    before_first = times[0].get("train_runtime")
    return times[-1]["time"] - times[0]["time"] + (before_first if _is_number(before_first) else 0.0)


def format_duration(seconds: float | None) -> str:
    """``1h 02m``, ``3m 20s`` or ``45s``."""
    if seconds is None:
        return MISSING
    whole = round(seconds)
    hours, minutes, secs = whole // 3600, whole // 60 % 60, whole % 60
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def accuracy_cell(evaluations: list[Evaluation], task: str) -> str:
    """``12.50 (n=40)`` per evaluation of ``task``, naming other test sets (MATH-500) and MetaMath's scoring."""
    cells = []
    for summary in (e.summary for e in evaluations if e.summary.get("task") == task):
        data = summary.get("data")
        notes = [DATA_NAMES.get(data, Path(str(data)).name)] if data and data != task else []
        if summary.get("scoring", "project") != "project":
            notes.append(f"{summary['scoring']} scoring")
        notes.append(f"n={summary.get('n', '?')}")
        accuracy = summary.get("accuracy")
        value = f"{100 * accuracy:.2f}" if _is_number(accuracy) else MISSING
        cells.append(f"{value} ({', '.join(notes)})")
    return "; ".join(cells) or MISSING


def held_out_cell(evaluations: list[Evaluation]) -> str:
    """``1.0381 (gsm8k, n=40)`` per evaluation directory that holds a held-out loss."""
    cells = [
        f"{e.held_out['loss']:.4f} ({e.held_out.get('task', '?')}, n={e.held_out.get('problems', '?')})"
        for e in evaluations
        if e.held_out is not None and _is_number(e.held_out.get("loss"))
    ]
    return "; ".join(cells) or MISSING


def table_row(row: Row, label: str) -> list[str]:
    """The cells of one row, in ``COLUMNS`` order."""
    run = row.run
    records = run.metrics if run else []
    params = run.trainable_params if run else None
    tokens_per_s, memory = median_tokens_per_s(records), peak_memory_gb(records)
    return [
        label,
        method_label(run.config.get("options", {})) if run else MISSING,
        MISSING if params is None else f"{params:,}",
        MISSING if tokens_per_s is None else f"{tokens_per_s:,.0f}",
        MISSING if memory is None else f"{memory:.2f}",
        *(accuracy_cell(row.evaluations, task) for task in TASKS),
        held_out_cell(row.evaluations),
        routing_cell(records),
        format_duration(wall_seconds(records)) if run else MISSING,
    ]


def markdown_table(rows: list[Row]) -> str:
    """The comparison table in Markdown (numbers right-aligned)."""
    lines = [COLUMNS, ["---", "---", *["---:"] * (len(COLUMNS) - 2)]]
    lines += [table_row(row, label) for row, label in zip(rows, row_labels(rows), strict=True)]
    return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines) + "\n"


# ------------------------------------------------------------------------------------------------------ the plots
def loss_figure(runs: list[tuple[str, Run]]) -> Figure | None:
    """Training loss against step, one line per run; None when no run logged a loss."""
    curves = [(label, *series(run.metrics, "loss")) for label, run in runs]
    curves = [curve for curve in curves if curve[1]]
    if not curves:
        return None
    fig, ax = _figure("Training loss", "training loss")
    for label, steps, losses in curves:
        ax.plot(steps, losses, marker=_marker(steps), label=label)
    ax.legend(loc="best")
    return fig


def route_counts(records: list[dict[str, Any]]) -> tuple[list[float], list[list[float]]]:
    """(steps, counts per logged step and group): the routes each group took since the previous log. Runs that
    logged shares only (``expert_load/groupI``, before route counts were logged) count each log as one route
    spread by its shares."""
    groups = expert_groups(records)
    steps, counts = [], []
    for record in records:
        routes = [record.get(f"expert_routes/group{g}") for g in groups]
        if not all(_is_number(c) for c in routes):
            routes = [record.get(f"expert_load/group{g}") for g in groups]
        if groups and _is_number(record.get("step")) and all(_is_number(c) for c in routes):
            steps.append(record["step"])
            counts.append([float(c) for c in routes])
    return steps, counts


def windowed_loads(counts: list[list[float]], window: float | None) -> list[list[float]]:
    """Per logged step, each group's share of the routes in the window that ends there: all routes so far
    (``window`` None, cumulative) or about the last ``window`` routes (whole logs, from the newest back)."""
    shares, running = [], [0.0] * len(counts[0]) if counts else []
    for end, row in enumerate(counts):
        running = [t + c for t, c in zip(running, row, strict=True)]  # cumulative: one pass
        total = running
        if window is not None:  # walk back over whole logs until the window is full
            total, start = [0.0] * len(row), end
            while start >= 0 and sum(total) < window:
                total = [t + c for t, c in zip(total, counts[start], strict=True)]
                start -= 1
        routes = sum(total)
        shares.append([t / routes if routes else 0.0 for t in total])
    return shares


def entropy_of(shares: list[float]) -> float:
    """Entropy (nats) of a load: 0 when one group takes everything, ln k when it is uniform."""
    return sum(-s * math.log(s) for s in shares if s > 0)


def routing_cell(records: list[dict[str, Any]]) -> str:
    """The whole run's group shares and routing entropy, e.g. ``0.26/0.24/0.25/0.25, H 1.38 of ln 4 = 1.39``."""
    _, counts = route_counts(records)
    if not counts:
        return MISSING
    (shares,) = windowed_loads(counts, None)[-1:]
    k = len(shares)
    return f"{'/'.join(f'{s:.2f}' for s in shares)}, H {entropy_of(shares):.2f} of ln {k} = {math.log(k):.2f}"


def expert_load_figure(label: str, run: Run) -> Figure | None:
    """Each expert group's share of all routes so far (cumulative), stacked (the paper's Figure 4); None without a
    load. One logging step holds few routes (its share jumps between 0 and 1), so the shares are taken over all
    routes up to each step: a balanced router reads as balanced, a collapsed one as collapsed."""
    steps, counts = route_counts(run.metrics)
    if not steps:
        return None
    groups = expert_groups(run.metrics)
    shares = list(zip(*windowed_loads(counts, None), strict=True))
    names = [f"group {g}" for g in groups]
    fig, ax = _figure(f"{label}: expert-group load (share of all routes so far)", "share of routes")
    if len(steps) > 1:
        ax.stackplot(steps, shares, labels=names, alpha=0.85)
    else:  # one logged step: an area needs two, so draw the stack as one bar
        bottoms = [sum(share[0] for share in shares[:i]) for i in range(len(groups))]
        for name, share, bottom in zip(names, shares, bottoms, strict=True):
            ax.bar(steps, share, bottom=bottom, label=name, width=0.6)
    ax.set_ylim(0, 1)
    # The legend lists the groups top to bottom as stacked, outside the axis: the stack fills all of it.
    handles, names = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], names[::-1], loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def expert_groups(records: list[dict[str, Any]]) -> list[int]:
    """The expert groups whose load the run logged (``expert_load/groupI``)."""
    return sorted({int(match[1]) for r in records for match in map(EXPERT_LOAD_KEY.fullmatch, r) if match})


def routing_entropy_figure(label: str, run: Run) -> Figure | None:
    """Routing entropy of the group load over all routes so far and over the last ``ROLLING_ROUTES`` routes, with
    ln k (a uniform load); None for a run without routing. The entropy of one logging step's few routes cannot
    reach ln k (2 routes: at most ln 2), so it is not what is plotted."""
    steps, counts = route_counts(run.metrics)
    if not steps:
        return None
    k = len(counts[0])
    fig, ax = _figure(f"{label}: routing entropy", "routing entropy (nats)")
    cumulative = [entropy_of(s) for s in windowed_loads(counts, None)]
    rolling = [entropy_of(s) for s in windowed_loads(counts, ROLLING_ROUTES)]
    ax.plot(steps, cumulative, marker=_marker(steps), label="all routes so far")
    ax.plot(steps, rolling, marker=_marker(steps), label=f"last {ROLLING_ROUTES} routes")
    uniform = math.log(k) if k > 1 else None
    if uniform is not None:
        ax.axhline(uniform, color="grey", linestyle="--", label=f"uniform load (ln k = ln {k} = {uniform:.2f})")
    ax.set_ylim(0, 1.1 * max([*cumulative, *rolling, uniform or 0.0]) or 1.0)  # from 0: a collapse shows as such
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: inside, it hid a collapsed router's points
    return fig


def _figure(title: str, ylabel: str) -> tuple[Figure, Axes]:
    """A figure without pyplot (no global state, no display): savefig renders with Agg."""
    fig = Figure(figsize=(8, 4.5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # optimizer steps: no ticks between them
    ax.grid(alpha=0.3)
    return fig, ax


def _marker(steps: list[float]) -> str | None:
    """Dots on short series, where a line alone would hide how few points there are."""
    return "o" if len(steps) <= 30 else None


def write_figure(fig: Figure, path: Path) -> None:
    """Save ``fig`` as a PNG, atomically."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))


def write_plots(rows: list[Row], out: Path) -> list[Path]:
    """Write loss.png and, per TuckA run, its expert-load and routing-entropy plots; return the files written."""
    runs = [(label, row.run) for row, label in zip(rows, row_labels(rows), strict=True) if row.run]
    figures = {"loss.png": loss_figure(runs)}
    for label, run in runs:
        stem = label.replace("/", "_")
        figures[f"{stem}_expert_load.png"] = expert_load_figure(label, run)
        figures[f"{stem}_routing_entropy.png"] = routing_entropy_figure(label, run)
    written = []
    for name, fig in figures.items():
        if fig is not None:
            write_figure(fig, out / name)
            written.append(out / name)
    return written


# ------------------------------------------------------------------------------------------------------ the report
def write_report(directories: list[Path], out: Path) -> tuple[str, list[Path]]:
    """Write ``report.md`` and the plots for ``directories`` into ``out``; return the table and the plot files."""
    unique = {path.resolve(): path for path in directories}.values()  # one directory named twice counts once
    items = [load_directory(path) for path in unique]
    rows = build_rows(items)
    table = markdown_table(rows)
    plots = write_plots(rows, out)
    listing = "\n".join(f"- [{plot.name}]({plot.name})" for plot in plots) or "(none: no training run was given)"
    atomic_write_text(out / REPORT, f"# Runs\n\n{table}\nPlots:\n\n{listing}\n")
    return table, plots


def main(argv: list[str] | None = None, prog: str = "tucka report") -> None:
    """Write the report and print the table; a directory that is not a run or an evaluation, or an --out that
    cannot be written, is a ReportError."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write report.md (one row per training run: method, trainable parameters, tokens/s, peak "
        "memory, GSM8K and MATH accuracy, wall time) and PNG plots (training loss; for TuckA runs, expert-group "
        "load and routing entropy) into --out, and print the table.",
    )
    parser.add_argument(
        "directories",
        nargs="+",
        type=Path,
        metavar="RUN_OR_EVAL_DIR",
        help=f"training run directories ({RUN_CONFIG}) and evaluation output directories ({SUMMARY})",
    )
    parser.add_argument("--out", required=True, type=Path, help=f"directory for {REPORT} and the PNG plots")
    args = parser.parse_args(argv)
    try:
        table, plots = write_report(args.directories, args.out)
    except OSError as error:  # --out is a file, or not writable
        raise ReportError(f"--out {args.out}: {error}") from None
    print(table, end="")
    print(f"wrote {args.out / REPORT} and {len(plots)} plots", file=sys.stderr)
