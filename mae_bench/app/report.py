"""``mae-bench report``: one Markdown and one HTML document from a results store and its sweep
manifest, with PNG figures beside them.

Per sweep in the store (and per data set + architecture when it ran on several): a top-1 table
with costs, the 95 % intervals, an uncertainty paragraph, accuracy-vs-knob (MAE paper Fig. 5),
accuracy-vs-cost and loss-curve figures, and MAE reconstruction grids. Then "Other results"
(rows from ``compare`` / ``eval``) and "How this was made" (commands, commits, versions, time).

The document is a list of small blocks (``evals/report_doc.py``) rendered twice, so report.md
and report.html always say the same thing. Statistics come from
:func:`mae_bench.results.aggregate`, never from here.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from evals.protocols import PROTOCOLS, headline
from mae_bench.app.report_doc import (
    Block,
    Code,
    Figure,
    Heading,
    Items,
    Paragraph,
    Table,
    to_html,
    to_markdown,
)
from mae_bench.app.sweep_knobs import SWEEP_KNOBS
from mae_bench.errors import ConfigError, MaeBenchError
from mae_bench.files import MANIFEST_FILE, METRICS_FILE
from mae_bench.results import (
    EVAL_KNOBS,
    RESULTS_FILE,
    aggregate,
    format_cell,
    group_columns,
    read_results,
)

PROTOCOL_ORDER = tuple(PROTOCOLS)  # the registry's order; a protocol it lacks goes last
# A sweep's reference rows (``mae-bench sweep`` evaluates them as ``compare`` does): what the
# knob's values must beat to mean anything.
REFERENCE_LABELS = {"random": "random encoder (reference)", "pixels": "pixels (reference)"}
REFERENCE_COLORS = {"random": "tab:red", "pixels": "0.4"}
# ---------------------------------------------------------------------------------- public API


@dataclass
class ReportOutcome:
    """What :func:`build_report` wrote."""

    markdown: Path
    html: Path
    figures: list[Path]
    notes: list[str]  # things skipped, one line each


@dataclass
class _Writer:
    """Where figures go, and what was written or skipped so far."""

    out_dir: Path
    grids: bool
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Group:
    """One sweep on one data set and architecture: one subsection of the report."""

    sweep: str
    column: str  # the store column holding the knob value
    numeric: bool
    dataset: str
    arch: str
    slug: str  # file-name stem of its figures


def compare_intervals(a_low: float, a_high: float, b_low: float, b_high: float) -> str:
    """"higher" / "lower" when interval a lies wholly above / below b, "overlap" when they share
    any point (touching counts), "unknown" when a bound is NaN (n < 2: no interval)."""
    if any(math.isnan(x) for x in (a_low, a_high, b_low, b_high)):
        return "unknown"
    if a_low > b_high:
        return "higher"
    if a_high < b_low:
        return "lower"
    return "overlap"


def build_report(results_dir: str | Path, out_dir: str | Path, *, grids: bool = True,
                 title: str = "mae-bench report") -> ReportOutcome:
    """Write ``report.md``, ``report.html`` and their PNG figures into ``out_dir``.

    Only the report's own files are (over)written; nothing else in ``out_dir`` is touched.

    Raises:
        ConfigError: ``results_dir`` holds no results store, or no row in it succeeded.
    """
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    fix = f"run mae-bench sweep / compare / eval with --results-dir {results_dir} first"
    if not (results_dir / RESULTS_FILE).is_file():
        raise ConfigError(f"no results store in {results_dir} (no {RESULTS_FILE}); {fix}")
    df = _drop_retried_failures(read_results(results_dir))
    ok = int((df["status"] == "ok").sum())
    if ok == 0:
        raise ConfigError(f"no successful results in {results_dir / RESULTS_FILE}; {fix}")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest, notes = _read_manifest(results_dir / MANIFEST_FILE)
    w = _Writer(out_dir, grids, notes=notes)
    if not grids:
        w.notes.append("reconstruction grids skipped (grids=False)")
    blocks: list[Block] = [Heading(title, 1), Paragraph(
        f"Built from {results_dir / RESULTS_FILE}: {len(df)} rows, {ok} ok, "
        f"{len(df) - ok} failed. Accuracies are top-1 in percent.")]
    # A store of eval / compare rows alone has no "sweep" column at all.
    swept = df["sweep"].notna() if "sweep" in df.columns else pd.Series(False, index=df.index)
    for sweep in dict.fromkeys(df.loc[swept, "sweep"].astype(str)) if swept.any() else ():
        entries = [m for m in manifest if m.get("sweep") == sweep]
        blocks += _sweep_section(df[swept & (df["sweep"] == sweep)], sweep, entries, w)
    blocks += _other_section(df[~swept], only=not swept.any())
    blocks += _provenance_section(df, manifest)
    if w.notes:
        blocks += [Heading("Notes"), Items(w.notes)]
    md, page = out_dir / "report.md", out_dir / "report.html"
    md.write_text(to_markdown(blocks), encoding="utf-8")
    page.write_text(to_html(blocks, title), encoding="utf-8")
    return ReportOutcome(md, page, w.figures, w.notes)


# -------------------------------------------------------------------------------- sweep tables


def _sweep_section(rows: pd.DataFrame, sweep: str, entries: list[dict], w: _Writer
                   ) -> list[Block]:
    """The section of one sweep: one subsection per (data set, architecture)."""
    knob = SWEEP_KNOBS.get(sweep)
    column = knob.column if knob else next(
        (str(e["column"]) for e in entries if e.get("column")), sweep.replace("-", "_"))
    numeric = knob.numeric if knob else False
    if column not in rows.columns or rows[column].isna().all():
        w.notes.append(f"sweep {sweep}: the store has no column {column!r}; runs shown by run_id")
        column, numeric = "run_id", False
    blocks: list[Block] = [Heading(f"Sweep: {sweep}")]
    is_reference = rows["method"].isin(list(REFERENCE_LABELS))
    references, rows = rows[is_reference], rows[~is_reference]
    pairs = list(dict.fromkeys(zip(rows["dataset"], rows["arch"], strict=True)))
    for dataset, arch in pairs:
        slug = _slug(sweep if len(pairs) == 1 else f"{sweep}-{dataset}-{arch}")
        g = _Group(sweep, column, numeric, dataset, arch, slug)
        sub = rows[(rows["dataset"] == dataset) & (rows["arch"] == arch)]
        mine = [e for e in entries if e.get("dataset", dataset) == dataset
                and e.get("arch", arch) == arch]
        refs = references[(references["dataset"] == dataset) & (
            (references["arch"] == arch) | (references["method"] == "pixels"))]
        blocks += _group_section(sub, g, mine, w, refs)
    return blocks


def _group_section(rows: pd.DataFrame, g: _Group, entries: list[dict], w: _Writer,
                   references: pd.DataFrame | None = None) -> list[Block]:
    """Tables, uncertainty, failures, figures and grids of one sweep on one data set / arch;
    the reference rows (random encoder, pixels) are shown beside the knob's values."""
    rows = rows.assign(_label=rows[g.column].map(_fmt_value))  # the knob value as text
    raw: dict[str, Any] = {}  # label -> a raw value, for sorting and the numeric axis
    for value, label in zip(rows[g.column].tolist(), rows["_label"].tolist(), strict=True):
        raw.setdefault(label, value)
    values = sorted(raw, key=lambda label: _sort_key(raw[label]))
    columns = _table_columns(rows)
    stats = {name: {r["_label"]: r for r in aggregate(part, by=["_label"]).to_dict("records")}
             for name, part in columns}
    if references is not None and len(references):
        for name, by_label in _reference_stats(references, columns).items():
            stats[name] |= by_label
    methods = ", ".join(dict.fromkeys(rows["method"].astype(str)))
    costs = _costs(rows, values)
    blocks: list[Block] = [
        Heading(f"{methods} {g.arch} on {_dataset_label(g.dataset)}", 3),
        *_tables(values, g, stats, costs),
        *_uncertainty(values, g, stats),
        *_failures(rows, entries),
    ]
    figures = [_accuracy_figure(values, raw, g, columns, stats, w),
               _cost_figure(values, g, columns, stats, costs, w),
               _loss_figure(values, g, entries, w), _online_figure(values, g, entries, w)]
    blocks += [f for f in figures if f is not None]
    return blocks + _grids(values, g, entries, w)


def _table_columns(rows: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Top-1 rows split into table columns: one per protocol and per setting of any evaluation
    knob varying within it. k-NN always names its k, and shows only k=20 when it was run."""
    top1 = rows[rows["metric"] == "top1"]
    order = {p: i for i, p in enumerate(PROTOCOL_ORDER)}
    out = []
    for protocol in sorted(top1["protocol"].unique(), key=lambda p: (order.get(p, 99), p)):
        part = _headline_rows(top1[top1["protocol"] == protocol], protocol)
        knobs = [c for c in EVAL_KNOBS if c in part.columns and (
            part[c].nunique(dropna=False) > 1 or (c == "k" and part[c].notna().any()))]
        if not knobs:
            out.append((f"{protocol} top-1", part))
            continue
        for key, sub in part.groupby(knobs, dropna=False, sort=True):
            named = ", ".join(f"{c}={_fmt_value(v)}" for c, v in zip(knobs, key, strict=True))
            out.append((f"{protocol} top-1 ({named})", sub))
    return out


def _headline_rows(part: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """A protocol's rows at its ``headline`` (k-NN: k=20) where some were run there, else all
    of them (a column per setting)."""
    pick = part
    for column, value in headline(protocol).items():
        pick = pick[pick[column] == value] if column in pick else pick.iloc[:0]
    return pick if len(pick) else part


def _reference_stats(references: pd.DataFrame, columns: list[tuple[str, pd.DataFrame]]
                     ) -> dict[str, dict[str, dict]]:
    """Top-1 statistics of the reference rows per table column, keyed by reference label. A
    reference row counts in a column when it has the column's protocol and, for every
    evaluation knob the column fixes (k=20, pool=cls), that value or none (pixels have no
    pool)."""
    top1 = references[references["metric"] == "top1"]
    out: dict[str, dict[str, dict]] = {}
    for name, part in columns:
        sel = top1[top1["protocol"] == part["protocol"].iloc[0]]
        for c in EVAL_KNOBS:
            fixed = part[c].dropna().unique() if c in part.columns else []
            if len(fixed) == 1 and c in sel.columns:
                sel = sel[sel[c].isna() | (sel[c] == fixed[0])]
        if len(sel):
            sel = sel.assign(_label=sel["method"].map(REFERENCE_LABELS))
            out[name] = {r["_label"]: r for r in aggregate(sel, by=["_label"]).to_dict("records")}
    return out


def _references_in(stats: dict[str, dict[str, dict]]) -> list[str]:
    """The reference labels with a number in some column, in REFERENCE_LABELS order."""
    return [label for label in REFERENCE_LABELS.values()
            if any(label in by_value for by_value in stats.values())]


def _costs(rows: pd.DataFrame, values: list[str]) -> dict[str, dict[str, float]]:
    """Mean pretraining seconds / GFLOPs per knob value, over distinct runs (each row of a run
    repeats its run's cost)."""
    runs = rows.drop_duplicates("run_id")
    out = {}
    for name, column in (("pretrain s", "pretrain_seconds"),
                         ("pretrain GFLOPs", "pretrain_gflops")):
        if column in runs.columns and runs[column].notna().any():
            means = runs.groupby("_label")[column].mean()
            out[name] = {v: float(means.get(v, math.nan)) for v in values}
    return out


def _tables(values: list[str], g: _Group, stats: dict[str, dict[str, dict]],
            costs: dict[str, dict[str, float]]) -> list[Block]:
    """The mean ± std table (best mean per column bold, costs appended) and the interval table."""
    names = list(stats)
    bold = set()
    for j, name in enumerate(names, start=1):
        means = [stats[name][v]["mean"] if v in stats[name] else math.nan for v in values]
        best = max((m for m in means if not math.isnan(m)), default=math.nan)
        bold |= {(i, j) for i, m in enumerate(means) if m == best}
    refs = _references_in(stats)
    body = [[v, *(format_cell(stats[n].get(v)) for n in names),
             *(_fmt_number(costs[c][v]) for c in costs)] for v in values]
    body += [[r, *(format_cell(stats[n].get(r)) for n in names), *("" for _ in costs)]
             for r in refs]
    ci = [[v, *(_interval(stats[n].get(v)) for n in names)] for v in [*values, *refs]]
    note = (" The reference rows are the same protocols on the same data with a randomly "
            "initialised encoder of the same architecture (one per seed) and on raw pixels: "
            "a value is only worth its pretraining where it beats them.") if refs else ""
    return [
        Paragraph("Top-1 accuracy (%) per value: mean ± sample std over seeds (n = ok runs); "
                  "best mean per column in bold. Costs are means over the value's runs."
                  + note),
        Table([g.column, *names, *costs], body, bold),
        Paragraph("95 % Student-t interval of the mean (none for n = 1):"),
        Table([g.column, *(f"{n} 95% CI" for n in names)], ci),
    ]


def _uncertainty(values: list[str], g: _Group, stats: dict[str, dict[str, dict]]
                 ) -> list[Block]:
    """One paragraph per column: is the best value really better than each other value?"""
    out: list[Block] = []
    for name, by_value in stats.items():
        shown = [v for v in values if v in by_value and by_value[v]["n"] > 0]
        refs = [r for r in REFERENCE_LABELS.values() if r in by_value and by_value[r]["n"] > 0]
        if len(shown) < 2 and not (shown and refs):
            continue
        best = max(shown, key=lambda v: by_value[v]["mean"])
        b = by_value[best]
        parts = [_verdict(b, by_value[v], v) for v in shown if v != best]
        parts += [_verdict(b, by_value[r], f"the {r.replace(' (reference)', '')} reference "
                           f"at {by_value[r]['mean']:.2f}") for r in refs]
        out.append(Paragraph(f"Uncertainty, {name}: the best {g.column} = {best} "
                             f"({b['mean']:.2f}) is " + "; ".join(parts) + "."))
    return out


def _verdict(b: dict, o: dict, other: str) -> str:
    """How statistics ``b`` compare with ``o`` (named ``other``), from their 95 % intervals."""
    verdict = compare_intervals(b["ci95_low"], b["ci95_high"], o["ci95_low"], o["ci95_high"])
    if verdict in ("higher", "lower"):
        return f"{verdict} than {other} (the 95 % intervals do not overlap)"
    if verdict == "overlap":
        return (f"not distinguishable from {other} at this number of seeds "
                f"(n={b['n']} vs n={o['n']}; the 95 % intervals overlap)")
    return f"not comparable with {other}: no interval can be given with n=1"


def _failures(rows: pd.DataFrame, entries: list[dict]) -> list[Block]:
    """Failed pretraining runs (manifest) and failed evaluations (store), with their errors."""
    body = [[_fmt_value(e.get("value")), _fmt_value(e.get("seed")), "pretraining",
             str(e.get("error") or "")] for e in entries if e.get("status") == "failed"]
    for r in rows[rows["status"] == "failed"].to_dict("records"):
        error = "" if _missing(r.get("error")) else str(r["error"])
        body.append([r["_label"], _fmt_value(r.get("seed")), f"{r['protocol']} {r['metric']}",
                     error])
    return [Paragraph("Failed runs:"), Table(["value", "seed", "stage", "error"], body)] \
        if body else []


# ------------------------------------------------------------------------------------- figures


def _accuracy_figure(values: list[str], raw: dict[str, Any], g: _Group,
                     columns: list[tuple[str, pd.DataFrame]], stats: dict, w: _Writer
                     ) -> Figure | None:
    """Accuracy vs. knob value, one panel per column: mean ± 95 % interval, seeds as dots, the
    references as horizontal lines."""
    if not columns:
        return None
    plt = _pyplot()
    numeric = g.numeric and all(_is_number(raw[v]) for v in values)
    xs = {v: float(raw[v]) if numeric else float(i) for i, v in enumerate(values)}
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.4), squeeze=False)
    for ax, (name, part) in zip(axes[0], columns, strict=True):
        s = [stats[name][v] for v in values if v in stats[name] and stats[name][v]["n"] > 0]
        x = [xs[r["_label"]] for r in s]
        means = [r["mean"] for r in s]
        err = _errors(s)
        repeated = any(r["n"] > 1 for r in s)  # an interval exists somewhere
        label = "mean ± 95% CI" if repeated else "one run each (no interval)"
        if numeric:
            ax.errorbar(x, means, yerr=err, fmt="o-", capsize=3, label=label)
        else:
            ax.bar(x, means, yerr=err, capsize=3, alpha=0.5, label=label)
            ax.set_xticks(list(xs.values()), values)
        ok = part[part["status"] == "ok"]
        if repeated:
            ax.scatter([xs[v] for v in ok["_label"]], ok["value"], s=12, alpha=0.35,
                       color="k", label="seeds")
        ref_means, ref_err = _reference_lines(ax, stats[name])
        ax.set_ylim(*_y_range(means + ref_means, [err[0] + ref_err[0], err[1] + ref_err[1]],
                              bars=not numeric))
        ax.set(title=name, xlabel=g.column, ylabel="top-1 accuracy (%)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{g.sweep}: accuracy vs. {g.column},\n{g.arch} on "
                 f"{_dataset_label(g.dataset)}", fontsize=10)
    return _save(fig, f"{g.slug}-accuracy.png", f"Top-1 accuracy vs. {g.column}", w)


def _errors(s: list[dict]) -> list[list[float]]:
    """Error bar lengths [below, above] of each statistic: its 95 % interval (0 when n = 1)."""
    return [[r["mean"] - r["ci95_low"] if r["n"] > 1 else 0.0 for r in s],
            [r["ci95_high"] - r["mean"] if r["n"] > 1 else 0.0 for r in s]]


def _reference_lines(ax: Any, by_value: dict[str, dict]
                     ) -> tuple[list[float], list[list[float]]]:
    """Draw each reference of a column as a dashed line with its 95 % band; return its means
    and error lengths, for the y-range."""
    means: list[float] = []
    s = []
    for method, label in REFERENCE_LABELS.items():
        r = by_value.get(label)
        if r is None or r["n"] == 0:
            continue
        color = REFERENCE_COLORS[method]
        ax.axhline(r["mean"], color=color, linestyle="--", linewidth=1,
                   label=f"{label}, {r['mean']:.2f}")
        if r["n"] > 1:
            ax.axhspan(r["ci95_low"], r["ci95_high"], color=color, alpha=0.12, linewidth=0)
        means.append(r["mean"])
        s.append(r)
    return means, _errors(s)


MIN_Y_SPAN = 5.0  # accuracy axes span at least this many points: no cliffs out of noise


def _y_range(means: list[float], err: list[list[float]], bars: bool) -> tuple[float, float]:
    """A y-range that shows the means with their intervals and spans at least MIN_Y_SPAN
    points, so a 0.15-point difference between single runs does not fill the axis; bars start
    at 0 (their height is the value)."""
    if not means:
        return 0.0, 100.0
    low = min(m - e for m, e in zip(means, err[0], strict=True))
    high = max(m + e for m, e in zip(means, err[1], strict=True))
    pad = max(MIN_Y_SPAN - (high - low), 0.0) / 2 + 0.05 * max(high - low, 1.0)
    low, high = max(0.0, low - pad), min(100.0, high + pad)
    return (0.0 if bars else low), high


def _cost_figure(values: list[str], g: _Group, columns: list[tuple[str, pd.DataFrame]],
                 stats: dict, costs: dict[str, dict[str, float]], w: _Writer) -> Figure | None:
    """Accuracy vs. pretraining time and compute: one row of panels per table column (every
    protocol, since their order can differ), each value's mean ± 95 % interval, the references
    as lines, and a y-axis that holds every interval (so noise never looks like a trend)."""
    if not columns or not costs:
        w.notes.append(f"{g.sweep}: no cost figure (no pretrain_seconds / pretrain_gflops)")
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(columns), len(costs),
                             figsize=(4.6 * len(costs), 3.3 * len(columns)), squeeze=False)
    for row, (name, _) in zip(axes, columns, strict=True):
        by_value = stats[name]
        for ax, (cost_name, cost) in zip(row, costs.items(), strict=True):
            shown = [v for v in values if v in by_value and by_value[v]["n"] > 0
                     and not math.isnan(cost[v])]
            xs = [cost[v] for v in shown]
            xlabel = "pretraining wall time (s)"
            if cost_name == "pretrain GFLOPs":
                peta = bool(xs) and max(xs) >= 1e6
                xs = [x / 1e6 if peta else x for x in xs]
                xlabel = f"pretraining compute ({'PFLOPs' if peta else 'GFLOPs'})"
            s = [by_value[v] for v in shown]
            means, err = [r["mean"] for r in s], _errors(s)
            ax.errorbar(xs, means, yerr=err, fmt="o", capsize=3,
                        label="mean ± 95% CI" if any(r["n"] > 1 for r in s) else "one run")
            if xs and min(xs) > 0 and max(xs) > 10 * min(xs):
                ax.set_xscale("log")
            else:
                ax.locator_params(axis="x", nbins=5)  # tick labels that do not run together
            ax.margins(x=0.12)
            _label_points(ax, xs, means, shown)
            ref_means, ref_err = _reference_lines(ax, by_value)
            ax.set_ylim(*_y_range(means + ref_means, [err[0] + ref_err[0], err[1] + ref_err[1]],
                                  bars=False))
            ax.set(xlabel=xlabel, ylabel=f"{name} (%)", title=f"{name} vs. cost")
            ax.title.set_fontsize(9)
            ax.legend(fontsize=6)
    fig.suptitle(f"{g.sweep}: accuracy vs. pretraining cost ({g.column}), "
                 f"{_dataset_label(g.dataset)}", fontsize=10)
    names = ", ".join(name for name, _ in columns)
    return _save(fig, f"{g.slug}-cost.png", f"{names} vs. pretraining cost", w)


def _label_points(ax: Any, xs: list[float], ys: list[float], labels: list[str]) -> None:
    """Name each point, written towards the middle of the axes so that no label runs past its
    edge: points in the right half get their label on their left."""
    if not xs:
        return
    scale = (lambda x: math.log10(x)) if ax.get_xscale() == "log" else (lambda x: x)
    middle = (scale(min(xs)) + scale(max(xs))) / 2
    for x, y, label in zip(xs, ys, labels, strict=True):
        right = len(xs) > 1 and scale(x) > middle
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(-5 if right else 5, 5),
                    ha="right" if right else "left", fontsize=8)


LINE_STYLES = ("-", "--", ":", "-.")


def _loss_figure(values: list[str], g: _Group, entries: list[dict], w: _Writer
                 ) -> Figure | None:
    """Pretraining loss per manifest run: one colour per knob value, one line style per seed,
    one legend entry per run."""
    if not entries:
        return None
    plt = _pyplot()
    labels = values + sorted({_fmt_value(e.get("value")) for e in entries} - set(values))
    runs = sorted(entries, key=lambda e: (_sort_key(e.get("value")), str(e.get("seed"))))
    seeds = list(dict.fromkeys(str(e.get("seed")) for e in runs))
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    drawn: set[str] = set()
    for e in runs:
        label = _fmt_value(e.get("value"))
        steps, losses = _read_curve(Path(str(e["run_dir"])) / METRICS_FILE) \
            if e.get("run_dir") else ([], [])
        if not steps:
            w.notes.append(f"{g.sweep} {g.column}={label} seed {e.get('seed')}: no loss curve "
                           f"({METRICS_FILE} missing or empty in {e.get('run_dir')})")
            continue
        name = f"{g.column}={label}, seed {_fmt_value(e.get('seed'))}"
        if name in drawn:  # two runs of one point (e.g. another setting): name the run too
            name += f" ({e.get('run_id', Path(str(e['run_dir'])).name)})"
        drawn.add(name)
        ax.plot(steps, losses, color=plt.get_cmap("tab10")(labels.index(label) % 10),
                linestyle=LINE_STYLES[seeds.index(str(e.get("seed"))) % len(LINE_STYLES)],
                alpha=0.8, label=name)
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="optimizer step", ylabel="pretraining loss",
           title=f"{g.sweep}: pretraining loss, {_dataset_label(g.dataset)}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
              ncol=1 if len(drawn) <= 16 else 2)
    return _save(fig, f"{g.slug}-loss.png", "Pretraining loss curves", w)


def _grids(values: list[str], g: _Group, entries: list[dict], w: _Writer) -> list[Block]:
    """One MAE reconstruction grid per knob value, from its first ok run with a checkpoint."""
    if not w.grids:
        return []
    out: list[Block] = []
    for label in values:
        mae = [e for e in entries if _fmt_value(e.get("value")) == label
               and e.get("method", "mae") == "mae" and e.get("status") == "ok"]
        ready = [e for e in mae if e.get("run_dir")
                 and (Path(str(e["run_dir"])) / "checkpoint.pt").is_file()]
        if not ready:
            if mae:
                w.notes.append(f"{g.sweep} {g.column}={label}: no checkpoint for a grid")
            continue
        path = w.out_dir / f"{g.slug}-recon-{_slug(label)}.png"
        try:
            from mae_bench.app.visualize import reconstruction_grid

            reconstruction_grid(ready[0]["run_dir"], path, num_images=6)
        except (MaeBenchError, OSError) as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            w.notes.append(f"{g.sweep} {g.column}={label}: no reconstruction grid ({first})")
            continue
        w.figures.append(path)
        out.append(Figure(path.name, f"MAE reconstructions, {g.column}={label} "
                                     f"(run {ready[0].get('run_id', ready[0]['run_dir'])})"))
    return out


def _save(fig: Any, name: str, caption: str, w: _Writer) -> Figure:
    path = w.out_dir / name
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    w.figures.append(path)
    return Figure(name, caption)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------ other / provenance


def _other_section(rows: pd.DataFrame, only: bool = False) -> list[Block]:
    """Rows without a sweep: top-1 mean ± std per group (every setting that varies shown);
    ``only``: the store holds nothing else (the section is then just "Results")."""
    top1 = rows[rows["metric"] == "top1"]
    if top1.empty:
        return []
    key = group_columns(top1)
    agg = aggregate(top1, by=key)
    ident = ["method", "arch", "dataset", "protocol"]
    shown = ident + [c for c in key if c not in ident + ["metric"]
                     and agg[c].nunique(dropna=False) > 1]
    body = [[_fmt_value(r[c]) for c in shown] + [format_cell(r), _interval(r)]
            for r in agg.to_dict("records")]
    return [Heading("Results" if only else "Other results"),
            Paragraph("Rows without a sweep (mae-bench compare / eval): top-1 accuracy (%), "
                      "mean ± std over seeds, 95 % Student-t interval."),
            Table(shown + ["top-1", "95% CI"], body)]


def _provenance_section(df: pd.DataFrame, manifest: list[dict]) -> list[Block]:
    """Commands, commits, software versions, time span and wall time per sweep."""
    blocks: list[Block] = [Heading("How this was made")]
    # the sweeps' commands, then every pretraining and evaluation command a row records
    commands = list(dict.fromkeys(_as_typed(str(c)) for c in (
        [e["command"] for e in manifest if e.get("command")]
        + [c for col in ("pretrain_command", "command") if col in df.columns
           for c in df[col].dropna().tolist() if c])))
    if commands:
        blocks += [Paragraph("Commands:"), *(Code(c) for c in commands)]
    shas = dict.fromkeys(s for s in [*df["git_sha"].tolist(), *(e.get("git_sha") for e in manifest)]
                         if isinstance(s, str) and s)
    blocks.append(Paragraph("Git commit(s): " + (", ".join(shas) or "unknown")))
    versions = [json.loads(v) for v in dict.fromkeys(
        json.dumps(e["versions"], sort_keys=True) for e in manifest
        if isinstance(e.get("versions"), dict))]
    if versions:
        keys = sorted(set().union(*versions))
        blocks += [Paragraph("Software:"),
                   Table(keys, [[str(v.get(k, "")) for k in keys] for v in versions])]
    stamps = pd.to_datetime(pd.Series([*df["timestamp"].tolist(),
                                       *(e.get("timestamp") for e in manifest)], dtype=object),
                            utc=True, errors="coerce", format="ISO8601").dropna()
    if len(stamps):
        blocks.append(Paragraph(f"Time span: {stamps.min().isoformat()} to "
                                f"{stamps.max().isoformat()}."))
    if "sweep" in df.columns and df["sweep"].notna().any():
        body = []
        for sweep in dict.fromkeys(df["sweep"].dropna().astype(str)):
            rows = df[df["sweep"] == sweep]
            # Every row of a run repeats its pretraining time; every row of one evaluation
            # (top1/top5, each k) repeats its evaluation time: count each once.
            pre = float(rows.drop_duplicates("run_id")["pretrain_seconds"].sum())
            ev = float(rows.drop_duplicates(["run_id", "protocol"])["eval_seconds"].sum())
            body.append([sweep, str(rows["run_id"].nunique()), f"{pre:.1f}", f"{ev:.1f}",
                         f"{pre + ev:.1f}"])
        blocks += [Paragraph("Wall time per sweep (seconds):"),
                   Table(["sweep", "runs", "pretraining", "evaluation", "total"], body)]
    return blocks


# ------------------------------------------------------------------------------------ helpers


def _drop_retried_failures(df: pd.DataFrame) -> pd.DataFrame:
    """Drop failed rows that a later ok row of the same run, protocol and metric replaced (a
    sweep re-run with --retry-failed): the store keeps both, the report counts the outcome."""
    if "timestamp" not in df.columns or not (df["status"] == "failed").any():
        return df
    # A run's ok rows carry run_id = folder + weights hash; a failed point's only the folder
    # name, so match on the folder (``checkpoint``).
    key = ["checkpoint" if "checkpoint" in df.columns else "run_id", "protocol", "metric"]
    ok_at = df[df["status"] == "ok"].groupby(key)["timestamp"].max()
    failed = df["status"] == "failed"
    later_ok = [bool(failed.iloc[i]) and tuple(r) in ok_at.index
                and ok_at[tuple(r)] >= df["timestamp"].iloc[i]
                for i, r in enumerate(df[key].itertuples(index=False))]
    return df[~pd.Series(later_ok, index=df.index)]


def _read_manifest(path: Path) -> tuple[list[dict], list[str]]:
    """Manifest entries, the last line winning per (sweep, value, seed, run_dir), and notes."""
    if not path.is_file():
        return [], [f"no {MANIFEST_FILE} in {path.parent}: no loss curves, grids or commands"]
    latest: dict[tuple, dict] = {}
    bad = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if not isinstance(entry, dict) or "sweep" not in entry:
            bad += 1
            continue
        key = (entry["sweep"], _fmt_value(entry.get("value")), str(entry.get("seed")),
               str(entry.get("run_dir")))
        latest[key] = entry
    return list(latest.values()), [f"skipped {bad} unreadable line(s) in {path}"] if bad else []


ONLINE_CURVES = (("online_knn_top1", "online k-NN top-1 (%)"),
                 ("online_linear_top1", "online linear top-1 (%)"))


def _online_figure(values: list[str], g: _Group, entries: list[dict], w: _Writer
                   ) -> Figure | None:
    """The online evaluation of every manifest run that has one (``evals/online.py``), one
    colour per knob value, one line style per seed (``online_curves``)."""
    labels = values + sorted({_fmt_value(e.get("value")) for e in entries} - set(values))
    runs = sorted(entries, key=lambda e: (_sort_key(e.get("value")), str(e.get("seed"))))
    seeds = list(dict.fromkeys(str(e.get("seed")) for e in runs))
    curves = [OnlineCurve(f"{g.column}={_fmt_value(e.get('value'))}, seed "
                          f"{_fmt_value(e.get('seed'))}",
                          labels.index(_fmt_value(e.get("value"))),
                          seeds.index(str(e.get("seed"))), Path(str(e["run_dir"])))
              for e in runs if e.get("run_dir")]
    fig = online_curves(curves, f"{g.sweep}: online evaluation during pretraining, "
                        f"{_dataset_label(g.dataset)}")
    if fig is None:
        return None
    return _save(fig, f"{g.slug}-online.png", "Online k-NN and linear top-1 while pretraining "
                 "(fixed train / test subsets; the final evaluation is in the tables)", w)


@dataclass(frozen=True)
class OnlineCurve:
    """One run's line in ``online_curves``: its legend label, colour and line-style indices
    and its folder (whose metrics.jsonl holds the online rows)."""

    label: str
    colour: int
    style: int
    run_dir: Path


def online_curves(curves: list[OnlineCurve], title: str) -> Any | None:
    """A figure of the runs' online k-NN and linear top-1 (rows) against pretraining epochs and
    wall time (columns); None when no run has an online row."""
    rows = [(c, _read_online(c.run_dir / METRICS_FILE)) for c in curves]
    rows = [(c, r) for c, r in rows if r]
    if not rows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharey="row")
    for c, run in rows:
        style = {"color": plt.get_cmap("tab10")(c.colour % 10), "alpha": 0.85, "marker": ".",
                 "linestyle": LINE_STYLES[c.style % len(LINE_STYLES)]}
        for i, (key, _) in enumerate(ONLINE_CURVES):
            axes[i][0].plot([r["epoch"] for r in run], [r[key] for r in run], **style,
                            label=c.label)
            axes[i][1].plot([r["train_seconds"] / 60 for r in run], [r[key] for r in run],
                            **style)
    for i, (_, name) in enumerate(ONLINE_CURVES):
        axes[i][0].set(xlabel="pretraining epoch", ylabel=name)
        axes[i][1].set(xlabel="pretraining wall time (min)")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_online_curves(curves: list[OnlineCurve], title: str, path: Path) -> Path | None:
    """``online_curves`` saved as the PNG ``path``; None (nothing written) without online rows."""
    fig = online_curves(curves, title)
    if fig is None:
        return None
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def _read_online(path: Path) -> list[dict[str, float]]:
    """The online-evaluation rows of a run's metrics.jsonl (epoch, training seconds and the
    accuracies); empty when it has none. Bad lines are skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            rows.append({k: float(row[k]) for k in
                         ("epoch", "train_seconds", *(key for key, _ in ONLINE_CURVES))})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return rows


def _read_curve(path: Path) -> tuple[list[float], list[float]]:
    """(steps, losses) of a run's metrics.jsonl; empty when missing. Bad lines are skipped."""
    if not path.is_file():
        return [], []
    steps, losses = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            step, loss = float(row["step"]), float(row["loss"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        if math.isfinite(loss):
            steps.append(step)
            losses.append(loss)
    return steps, losses


def _as_typed(command: str) -> str:
    """A recorded command as the user typed it: ``mae-bench ...`` whether it was recorded from
    ``sys.argv`` (``/path/to/venv/bin/mae-bench``, ``.../mae_bench/__main__.py``, ``python -m
    mae_bench``) or written as ``mae-bench``, so one command is listed once."""
    try:
        words = shlex.split(command)
    except ValueError:  # unbalanced quotes: keep it as it is
        return command.strip()
    if len(words) >= 3 and re.fullmatch(r"python[0-9.]*", Path(words[0]).name) \
            and words[1:3] == ["-m", "mae_bench"]:
        words = ["mae-bench", *words[3:]]
    elif words and (Path(words[0]).name == "mae-bench" or words[0].replace("\\", "/").endswith(
            "mae_bench/__main__.py")):
        words = ["mae-bench", *words[1:]]
    return shlex.join(words)


def _interval(s: dict | None) -> str:
    if s is None or int(s["n"]) < 2:
        return "–"
    return f"[{s['ci95_low']:.2f}, {s['ci95_high']:.2f}]"


def _fmt_value(value: Any) -> str:
    """A knob value as shown and matched: 0.75, 4 (not 4.0), True, mae; "–" when missing."""
    if _missing(value):
        return "–"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:g}"
    return str(value)


def _fmt_number(value: float) -> str:
    if math.isnan(value):
        return ""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _sort_key(value: Any) -> tuple[int, float, str]:
    return (0, float(value), "") if _is_number(value) else (1, 0.0, str(value))


def _is_number(value: Any) -> bool:
    try:
        return not math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _dataset_label(dataset: str) -> str:
    return "CIFAR-10 (JPEG q75)" if dataset == "cifar10" else str(dataset)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"
