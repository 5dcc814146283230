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
    from mae_bench.engine import pretrain

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
