"""Tests for evals/report.py: tables, intervals, figures and provenance of ``mae-bench report``."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from mae_bench.app.report import build_report, compare_intervals
from mae_bench.errors import ConfigError
from mae_bench.results import append_rows, make_row

# Student-t 0.975 quantile with 2 degrees of freedom, in closed form: t^2 = a^2 / (2p(1-p)),
# a = 2p - 1 (= 4.3026527...).
T_975_DF2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)
PNG = b"\x89PNG"
SHA = "0123456789abcdef0123456789abcdef01234567"

# mask ratio -> (knn k=20 seeds, linear seeds, pretrain GFLOPs)
SWEEP = {0.25: ([60, 61, 62], [48, 49, 50], 1e3),
         0.5: ([70, 72, 74], [55, 56, 57], 5e3),
         0.75: ([71, 74, 77], [53, 55, 57], 2e4)}
COMMAND = "mae-bench sweep mask-ratio --values 0.25,0.5,0.75 --seeds 3"


def _row(value, **fields) -> dict:
    base = dict(method="mae", arch="vit_micro_patch2", dataset="digits", metric="top1",
                timestamp="2026-11-29T12:00:00+00:00", git_sha=SHA)
    return make_row(value=value, **(base | fields))


def _sweep_rows() -> list[dict]:
    rows = []
    for i, (ratio, (knn, linear, gflops)) in enumerate(SWEEP.items()):
        for seed in range(3):
            run = dict(run_id=f"mr{ratio}-s{seed}", sweep="mask-ratio", mask_ratio=ratio,
                       seed=seed, pretrain_seconds=100.0 * (i + 1) + seed,
                       pretrain_gflops=gflops)
            rows += [_row(knn[seed], protocol="knn", k=20, eval_seconds=1.0, **run),
                     _row(knn[seed] - 10, protocol="knn", k=10, eval_seconds=1.0, **run),
                     _row(linear[seed], protocol="linear", eval_seconds=2.0, **run)]
    rows.append(_row(None, status="failed", error="shape <3> mismatch", protocol="linear",
                     run_id="mr0.5-s3", sweep="mask-ratio", mask_ratio=0.5, seed=3,
                     pretrain_seconds=200.0, eval_seconds=0.5))
    # A sweep whose knob column the store lacks: shown by run_id, never a crash.
    rows.append(_row(30.0, protocol="knn", k=20, run_id="wu-s0", sweep="warmup", seed=0))
    rows += [_row(v, method="simclr", protocol="linear", run_id=f"simclr-s{s}", seed=s)
             for s, v in enumerate([40.0, 42.0])]
    return rows


def _entry(ratio, seed, run_dir, status="ok", error=None) -> dict:
    return {"sweep": "mask-ratio", "column": "mask_ratio", "value": ratio, "seed": seed,
            "run_id": f"mr{ratio}-s{seed}", "run_dir": str(run_dir), "method": "mae",
            "arch": "vit_micro_patch2", "dataset": "digits", "status": status, "error": error,
            "command": COMMAND, "timestamp": f"2026-11-29T1{seed}:00:00+00:00", "git_sha": SHA,
            "versions": {"python": "3.11.2", "torch": "2.14.1", "mae_bench": "0.1.0"}}


def _write_manifest(store: Path, entries: list[dict]) -> None:
    with open(store / "sweeps.jsonl", "w") as fh:
        fh.writelines(json.dumps(e) + "\n" for e in entries)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    store, out = root / "store", root / "out"
    append_rows(store, _sweep_rows())
    entries = [_entry(0.25, 0, root / "runs" / "old", "failed", "first attempt")]
    for ratio in SWEEP:
        for seed in range(3):
            run_dir = root / "runs" / f"mr{ratio}-s{seed}"
            run_dir.mkdir(parents=True)
            if (ratio, seed) != (0.75, 2):  # one run without metrics.jsonl: noted, skipped
                losses = [1.0 - ratio / 2, 0.8 - ratio / 2, 0.7 - ratio / 2]
                (run_dir / "metrics.jsonl").write_text("".join(
                    json.dumps({"step": 10 * (j + 1), "loss": loss}) + "\n"
                    for j, loss in enumerate(losses)))
            entries.append(_entry(ratio, seed, run_dir))
    entries[0]["run_dir"] = entries[1]["run_dir"]  # same point: the later ok line wins
    entries.append(_entry(0.9, 0, root / "runs" / "mr0.9", "failed", "<oops>"))
    _write_manifest(store, entries)
    out.mkdir()
    (out / "keep.txt").write_text("not the report's")
    first = build_report(store, out, grids=False)
    md_first = first.markdown.read_text()
    outcome = build_report(store, out, grids=False)
    return outcome, md_first, outcome.markdown.read_text(), outcome.html.read_text()


def _line(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def test_table_cells_are_mean_std_n_with_best_bold_and_failures(report):
    _, _, md, page = report
    header = _line(md, "| mask_ratio |")
    assert header == ("| mask_ratio | knn top-1 (k=20) | linear top-1 | pretrain s "
                      "| pretrain GFLOPs |")  # k=10 is left out when k=20 was run
    # knn 70, 72, 74 -> 72 ± 2; linear 55, 56, 57 -> 56 ± 1 (the best, bold) plus the failure;
    # pretraining seconds 200, 201, 202 and 200 (the failed evaluation's run) -> 200.75.
    assert _line(md, "| 0.5 |") == \
        "| 0.5 | 72.00 ± 2.00 (n=3) | **56.00 ± 1.00 (n=3, 1 failed)** | 200.8 | 5,000 |"
    assert _line(md, "| 0.75 |").startswith("| 0.75 | **74.00 ± 3.00 (n=3)** | 55.00 ± 2.00")
    assert "<td><b>74.00 ± 3.00 (n=3)</b></td>" in page


def test_interval_matches_hand_computed_t_interval(report):
    _, _, md, _ = report
    half = T_975_DF2 * 3.0 / math.sqrt(3)  # knn 71, 74, 77: std 3, n 3
    line = _line(md, "| 0.75 | [")
    assert line.startswith(f"| 0.75 | [{74 - half:.2f}, {74 + half:.2f}] |")
    assert f"[{74 - half:.2f}, {74 + half:.2f}]" == "[66.55, 81.45]"


def test_uncertainty_says_higher_only_when_intervals_separate(report):
    _, _, md, _ = report
    text = _line(md, "Uncertainty, knn top-1 (k=20):")
    assert "the best mask_ratio = 0.75 (74.00)" in text
    # [66.55, 81.45] vs 61 ± 2.48 = [58.52, 63.48]: separate; vs [67.03, 76.97]: overlap.
    assert "higher than 0.25" in text
    assert "not distinguishable from 0.5" in text
    assert "higher than 0.5" not in text


def test_compare_intervals_hand_cases():
    assert compare_intervals(5, 6, 1, 2) == "higher"
    assert compare_intervals(1, 2, 5, 6) == "lower"
    assert compare_intervals(1, 3, 2, 4) == "overlap"
    assert compare_intervals(1, 2, 2, 3) == "overlap"  # touching: not a difference
    assert compare_intervals(math.nan, math.nan, 1, 2) == "unknown"
    assert compare_intervals(5, 6, 1, math.nan) == "unknown"


def test_figures_are_pngs_referenced_by_both_documents(report):
    outcome, _, md, page = report
    names = sorted(p.name for p in outcome.figures)
    assert names == ["mask-ratio-accuracy.png", "mask-ratio-cost.png", "mask-ratio-loss.png",
                     "warmup-accuracy.png"]
    for path in outcome.figures:
        assert path.parent == outcome.markdown.parent
        data = path.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG)
        assert f"]({path.name})" in md and f'src="{path.name}"' in page


def test_html_escapes_errors_and_later_manifest_lines_win(report):
    _, _, md, page = report
    assert "shape &lt;3&gt; mismatch" in page and "shape <3>" not in page
    assert "&lt;oops&gt;" in page and "<oops>" not in page
    assert "| 0.9 | 0 | pretraining | &lt;oops> |" in md  # rendered Markdown shows "<oops>"
    assert "first attempt" not in md


def test_notes_other_results_and_provenance(report):
    outcome, _, md, page = report
    notes = "\n".join(outcome.notes)
    assert "mask_ratio=0.75 seed 2: no loss curve" in notes and "mr0.75-s2" in notes
    assert "reconstruction grids skipped" in notes
    assert "sweep warmup: the store has no column 'warmup'" in notes
    assert _line(md, "| wu-s0 |").startswith("| wu-s0 | **30.00 (n=1)** |")
    other = md[md.index("## Other results"):]
    assert "| simclr | vit_micro_patch2 | digits | linear | 41.00 ± 1.41 (n=2) |" in other
    assert f"```\n{COMMAND}\n```" in md and f"<pre><code>{COMMAND}</code></pre>" in page
    assert SHA in md and "2.14.1" in md
    assert "Time span: 2026-11-29T10:00:00+00:00 to 2026-11-29T12:00:00+00:00." in md
    # pretraining: 3 x (100 + 200 + 300) + 3 x (0 + 1 + 2) + 200 (the failed row's run) = 2009;
    # evaluation once per (run, protocol): 9 x (1 + 2) + 0.5 = 27.5.
    assert "| mask-ratio | 10 | 2009.0 | 27.5 | 2036.5 |" in md


def test_rerun_is_identical_and_leaves_other_files(report):
    outcome, md_first, md, _ = report
    assert md == md_first
    assert (outcome.markdown.parent / "keep.txt").read_text() == "not the report's"


def test_missing_or_empty_store_is_a_config_error(tmp_path):
    where = re.escape(str(tmp_path))
    with pytest.raises(ConfigError, match=f"no results store in {where} .*mae-bench sweep"):
        build_report(tmp_path, tmp_path / "out")
    append_rows(tmp_path, [_row(None, status="failed", protocol="knn", run_id="r")])
    with pytest.raises(ConfigError, match="no successful results in"):
        build_report(tmp_path, tmp_path / "out")


def test_real_reconstruction_grid(tmp_path, one_thread):
    from mae_bench.config import RunConfig
    from mae_bench.methods.engine import pretrain

    cfg = RunConfig().replace(model={"arch": "vit_micro_patch2"}, data={"dataset": "digits"},
                              train={"epochs": 1, "batch_size": 64})
    run_dir = tmp_path / "run"
    pretrain(cfg, run_dir, max_steps=2, progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")
    store = tmp_path / "store"
    append_rows(store, [_row(50.0 + i, protocol="knn", k=20, run_id=f"mr{r}-s0",
                             sweep="mask-ratio", mask_ratio=r, seed=0)
                        for i, r in enumerate((0.5, 0.75))])
    _write_manifest(store, [_entry(0.75, 0, run_dir), _entry(0.5, 0, broken)])
    outcome = build_report(store, tmp_path / "out")
    grid = tmp_path / "out" / "mask-ratio-recon-0.75.png"
    assert grid in outcome.figures and grid.read_bytes().startswith(PNG)
    assert "](mask-ratio-recon-0.75.png)" in outcome.markdown.read_text()
    assert any(n.startswith("mask-ratio mask_ratio=0.5: no reconstruction grid")
               for n in outcome.notes)


def test_report_cli_without_store_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    from cli_helpers import run_cli

    code, _, err = run_cli(monkeypatch, capsys, "report", "--results-dir",
                           str(tmp_path / "nothing"), "--out", str(tmp_path / "report"))
    assert code == 2
    assert f"no results store in {tmp_path / 'nothing'}" in err and "Traceback" not in err
    assert not (tmp_path / "report").exists()


def test_a_store_of_eval_rows_alone_gets_a_report(tmp_path):
    """No row has a "sweep" field at all (mae-bench eval / compare only): the report lists
    them as its results, never a KeyError."""
    store = tmp_path / "store"
    append_rows(store, [_row(v, protocol="knn", k=20, run_id="r", seed=s)
                        for s, v in enumerate([50.0, 54.0])])
    out = build_report(store, tmp_path / "report")
    md = out.markdown.read_text()
    assert "## Results" in md and "Other results" not in md
    assert "52.00 ± 2.83 (n=2)" in md


# --- figures, commands and references (issue 28, item 17) -------------------------------------


@pytest.fixture
def drawn(tmp_path, monkeypatch):
    """Build the sweep report with every figure's axes recorded as the report saved them:
    {file name: [(title, y-limits, error bars [(x, low, high)], legend labels, point labels
    that run out of their axes)]}."""
    import mae_bench.app.report as report_module

    real_save, seen = report_module._save, {}

    def save(fig, name, caption, w):
        fig.tight_layout()  # as _save lays it out, before it closes the figure
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        panels = []
        for ax in fig.axes:
            bars = [(float(seg[0][0]), float(seg[0][1]), float(seg[1][1]))
                    for c in ax.containers if hasattr(c, "has_yerr") and c.has_yerr
                    for seg in c.lines[2][0].get_segments()]
            legend = ax.get_legend()
            box = ax.get_window_extent(renderer)
            outside = [t.get_text() for t in ax.texts
                       if not box.contains(*t.get_window_extent(renderer).min)
                       or not box.contains(*t.get_window_extent(renderer).max)]
            panels.append((ax.get_title(), ax.get_ylim(), bars,
                           [t.get_text() for t in legend.get_texts()] if legend else [],
                           outside))
        seen[name] = panels
        return real_save(fig, name, caption, w)

    monkeypatch.setattr(report_module, "_save", save)
    store = tmp_path / "store"
    append_rows(store, _sweep_rows())
    entries = []
    for ratio in SWEEP:
        for seed in range(3):
            run_dir = tmp_path / "runs" / f"mr{ratio}-s{seed}"
            run_dir.mkdir(parents=True)
            online = [{"epoch": j, "train_seconds": 60.0 * j, "online_knn_top1": 50 + j + seed,
                       "online_linear_top1": 40 + j} if j else {} for j in range(3)]
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(
                {"step": 10 * j, "loss": 1.0 - ratio / 2 - 0.01 * (j + seed)} | online[j]) + "\n"
                for j in range(3)))
            entries.append(_entry(ratio, seed, run_dir))
    _write_manifest(store, entries)
    build_report(store, tmp_path / "out", grids=False)
    return seen


def test_cost_figure_shows_every_protocol_with_its_intervals(drawn):
    """k-NN and linear, against time and compute: one panel each, every value's 95 % interval
    as an error bar, a y-range that holds all of them, and point labels inside the axes."""
    panels = drawn["mask-ratio-cost.png"]
    assert [p[0] for p in panels] == ["knn top-1 (k=20) vs. cost"] * 2 + \
        ["linear top-1 vs. cost"] * 2
    # hand-computed t intervals: mean ± T_975_DF2 * std / sqrt(3)
    half = {std: T_975_DF2 * std / math.sqrt(3) for std in (1.0, 2.0, 3.0)}
    knn = [(61.0, half[1.0]), (72.0, half[2.0]), (74.0, half[3.0])]
    linear = [(49.0, half[1.0]), (56.0, half[1.0]), (55.0, half[2.0])]
    for (_, (y_low, y_high), bars, _, outside), expected in zip(
            panels, [knn, knn, linear, linear], strict=True):
        assert [(round(lo, 6), round(hi, 6)) for _, lo, hi in bars] == \
            [(round(m - h, 6), round(m + h, 6)) for m, h in expected]
        assert y_low <= min(lo for _, lo, _ in bars) and y_high >= max(hi for _, _, hi in bars)
        assert outside == []
    seconds = [x for x, _, _ in panels[0][2]]
    # mean pretraining seconds per value (0.5 also counts its failed run's 200 s)
    assert seconds == pytest.approx([101.0, 200.75, 301.0])


def test_loss_figure_has_one_legend_entry_per_run(drawn):
    (panel,) = drawn["mask-ratio-loss.png"]
    legend = panel[3]
    assert len(legend) == 9 and len(set(legend)) == 9  # 3 values x 3 seeds
    assert "mask_ratio=0.5, seed 2" in legend


def test_online_figure_draws_both_accuracies_against_epochs_and_wall_time(drawn):
    """Runs with an online evaluation get its curves: k-NN and linear (rows) against epochs and
    minutes (columns), one legend entry per run; the report fixture's runs have none and get
    no such figure (test_figures_are_pngs_referenced_by_both_documents)."""
    panels = drawn["mask-ratio-online.png"]
    assert len(panels) == 4
    legend = panels[0][3]
    assert len(legend) == 9 and "mask_ratio=0.75, seed 1" in legend
    low, high = panels[0][1]  # k-NN: 51 .. 54 over the runs
    assert low <= 51 and high >= 54


def test_commands_are_listed_once_whatever_program_path_recorded_them(tmp_path):
    """The sweep's manifest says ``mae-bench sweep ...``; its runs' run.json (``sys.argv``)
    said ``/venv/bin/mae-bench sweep ...`` or ``.../mae_bench/__main__.py sweep ...``."""
    store = tmp_path / "store"
    paths = ["/opt/venv/bin/mae-bench", "/src/mae_bench/__main__.py", "python3 -m mae_bench"]
    append_rows(store, [_row(50.0 + i, protocol="knn", k=20, run_id=f"mr0.5-s{i}",
                             sweep="mask-ratio", mask_ratio=0.5, seed=i,
                             pretrain_command=COMMAND.replace("mae-bench", prog))
                        for i, prog in enumerate(paths)])
    _write_manifest(store, [_entry(0.5, 0, tmp_path / "run")])
    md = build_report(store, tmp_path / "out", grids=False).markdown.read_text()
    assert md.count("```\nmae-bench sweep") == 1 and f"```\n{COMMAND}\n```" in md
    assert "/opt/venv" not in md and "__main__" not in md


def test_sweep_reference_rows_are_shown_beside_the_values(tmp_path):
    """Random-encoder and pixels rows of a sweep: a row of each table (not a value of the knob,
    not a subsection of their own), compared with the best value, and lines in the figures."""
    store = tmp_path / "store"
    rows = _sweep_rows()
    for seed, value in enumerate([55.0, 56.5, 58.0]):  # random: 56.5 ± 1.5
        rows.append(_row(value, method="random", protocol="linear", run_id=f"random-{seed}",
                         sweep="mask-ratio", seed=seed, pool="cls"))
    rows.append(_row(45.0, method="pixels", arch="pixels", protocol="linear", run_id="pixels",
                     sweep="mask-ratio", seed=0))
    append_rows(store, rows)
    md = build_report(store, tmp_path / "out", grids=False).markdown.read_text()
    assert _line(md, "| random encoder (reference) |") == \
        "| random encoder (reference) |  | 56.50 ± 1.50 (n=3) |  |  |"
    assert _line(md, "| pixels (reference) |") == "| pixels (reference) |  | 45.00 (n=1) |  |  |"
    half = T_975_DF2 * 1.5 / math.sqrt(3)
    ci = [line for line in md.splitlines() if line.startswith("| random encoder")][1]
    assert ci == f"| random encoder (reference) | – | [{56.5 - half:.2f}, {56.5 + half:.2f}] |"
    text = _line(md, "Uncertainty, linear top-1:")
    assert "not distinguishable from the random encoder reference at 56.50" in text
    assert "pixels" not in md.split("## Other results")[0].split("### ")[1].split("\n")[0]
    assert md.count("### ") == 2  # mask-ratio and warmup: no subsection for pixels
