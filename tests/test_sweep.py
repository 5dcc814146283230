"""``mae-bench sweep``: every (value, seed) point trained and evaluated once, resumable after a
kill, a failing point recorded as failed while the others finish, bad input rejected first."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import run_cli

from mae_bench.app.sweep import (
    MANIFEST,
    SweepSpec,
    plan_points,
    point_states,
    run_sweep,
    sweep_summary,
)
from mae_bench.app.sweep_knobs import SWEEP_KNOBS, get_knob
from mae_bench.errors import ConfigError, StoreWriteError, TrainingError
from mae_bench.results import read_results

pytestmark = pytest.mark.usefixtures("one_thread")

# A micro ViT on digits for 2 optimizer steps: a point takes about a second.
TINY = {"arch": "vit_micro_patch2", "epochs": 0.1, "batch_size": 64, "protocols": ("knn",),
        "references": False}  # the reference rows have their own test


def _spec(tmp_path: Path, **kw) -> SweepSpec:
    base = {"knob": "mask-ratio", "values": ("0.5", "0.75"), "seeds": (0,),
            "runs_dir": str(tmp_path / "runs"), "results_dir": str(tmp_path / "results"),
            "cache_dir": str(tmp_path / "cache"), "command": "mae-bench sweep test"}
    return SweepSpec(**(base | TINY | kw))


def _point_counts(results_dir: Path) -> dict[tuple, int]:
    """Rows per (run, protocol, metric, k): a sweep that duplicated a row shows a 2."""
    df = read_results(results_dir)
    df["k"] = df["k"].fillna(-1)  # retrieval metrics have no k (NaN keys never compare equal)
    counts = df.groupby(["checkpoint", "protocol", "metric", "k"]).size()
    return {key: int(n) for key, n in counts.items()}


# --- knobs and planning ----------------------------------------------------------------------


@pytest.mark.parametrize(("knob", "text", "message"), [
    ("mask-ratio", "1.0", "mask-ratio values must be in (0, 1), got 1.0"),
    ("mask-ratio", "x", "mask-ratio values must be a number, got 'x'"),
    ("decoder-depth", "0", "decoder-depth values must be >= 1, got 0"),
    ("decoder-dim", "1.5", "decoder-dim values must be a whole number, got '1.5'"),
    ("mask-strategy", "checker", "unknown mask strategy 'checker'; valid: random, block, grid"),
    ("norm-pix-loss", "maybe", "norm-pix-loss values must be true or false, got 'maybe'"),
    ("epochs", "-1", "epochs values must be > 0, got -1"),
    ("target-scale", "0.2-0.1", "target-scale values must lie in (0, 1) with the low end first, "
     "got 0.2-0.1"),
    ("target-scale", "big", "target-scale values must be a fraction or a range like 0.15-0.2, "
     "got 'big'"),
    ("num-targets", "0", "num-targets values must be >= 1, got 0"),
])
def test_bad_values_are_named(knob, text, message):
    with pytest.raises(ConfigError) as err:
        get_knob(knob).parse(text)
    assert str(err.value) == message


def test_knob_values_parse_to_config_types():
    assert get_knob("mask-ratio").parse("0.75") == 0.75
    assert get_knob("decoder-depth").parse("4") == 4
    assert get_knob("norm-pix-loss").parse("False") is False
    assert get_knob("method").parse("dino") == "dino"
    scale = get_knob("target-scale")
    assert scale.parse("0.15-0.2") == (0.15, 0.2) and scale.parse("0.3") == (0.3, 0.3)
    assert scale.assign((0.15, 0.2)) == {"mae": {"target_scale_min": 0.15,
                                                 "target_scale_max": 0.2}}
    assert scale.label((0.15, 0.2)) == "0.15-0.2"
    assert get_knob("num-masks").assign(2) == {"mae": {"num_masks": 2}}
    with pytest.raises(ConfigError, match="unknown method 'dinov2'"):
        get_knob("method").parse("dinov2")
    with pytest.raises(ConfigError, match="unknown sweep knob 'lr'; valid: mask-ratio"):
        get_knob("lr")


def test_plan_puts_each_value_in_the_config_and_names_runs_apart(tmp_path):
    spec = _spec(tmp_path, knob="decoder-depth", values=("1", "2"), seeds=(0, 3))
    points = plan_points(spec)
    assert [(p.value, p.seed) for p in points] == [(1, 0), (1, 3), (2, 0), (2, 3)]
    assert [p.cfg.model.decoder_depth for p in points] == [1, 1, 2, 2]
    assert [p.cfg.train.seed for p in points] == [0, 3, 0, 3]
    assert len({p.run_dir for p in points}) == 4
    assert points[0].run_dir.parent.name == "decoder-depth-digits-vit_micro_patch2"
    assert points[1].run_dir.name.startswith("decoder-depth=1-seed3-")
    assert points[0].cfg.train.blr == 1.5e-4  # method defaults resolved


@pytest.mark.parametrize(("kw", "message"), [
    ({"knob": "mask-ratio", "method": "simclr"},
     "mask-ratio is a knob of mae, simmim, ibot, data2vec2; --method simclr does not have it"),
    ({"knob": "num-targets", "values": ("4",)},
     "num-targets is a knob of ijepa; --method mae does not have it"),
    ({"values": ("0.5", "0.5")}, "--values lists a value twice: 0.5,0.5"),
    ({"seeds": (1, 1)}, "--seeds lists a seed twice: 1,1"),
    ({"protocols": ("knn", "probe")}, "unknown protocol 'probe'; valid: knn, linear"),
    ({"knob": "epochs", "values": ()}, "sweep epochs needs --values"),
    ({"values": ("0.97",)}, "mask-ratio=0.97: mask_ratio=0.97 leaves 0 of 16 patches visible"),
    ({"knob": "decoder-dim", "values": ("33",)}, "decoder-dim=33: decoder_embed_dim 33 must be"),
])
def test_bad_sweeps_fail_before_anything_runs(tmp_path, kw, message):
    with pytest.raises(ConfigError) as err:
        run_sweep(_spec(tmp_path, **kw), log=lambda _: None, progress=False)
    assert str(err.value).startswith(message)
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()


def test_every_knob_plans_on_tiny_models(tmp_path):
    values = {"mask-ratio": ("0.5",), "decoder-depth": ("1",), "decoder-dim": ("16",),
              "mask-strategy": ("grid",), "norm-pix-loss": ("false",),
              "encoder-mask-tokens": ("true",), "epochs": ("0.2",), "method": ("simclr",),
              "mask-patch-size": ("4",), "num-targets": ("2",), "num-masks": ("2",),
              "target-scale": ("0.125-0.15",)}
    methods = {"mask-patch-size": "simmim", "num-targets": "ijepa", "num-masks": "data2vec2",
               "target-scale": "ijepa"}
    assert set(values) == set(SWEEP_KNOBS)
    for knob, vals in values.items():
        (point,) = plan_points(_spec(tmp_path, knob=knob, values=vals,
                                     method=methods.get(knob, "mae")))
        knob_ = get_knob(knob)
        assert knob_.label(knob_.parse(vals[0])) == point.value
        for section, fields in knob_.assign(knob_.parse(vals[0])).items():
            assert {k: getattr(getattr(point.cfg, section), k) for k in fields} == fields
    (point,) = plan_points(_spec(tmp_path, knob="target-scale", values=("0.125-0.15",),
                                 method="ijepa"))
    assert (point.cfg.mae.target_scale_min, point.cfg.mae.target_scale_max) == (0.125, 0.15)
    assert point.value == "0.125-0.15" and point.run_dir.name.startswith("target-scale=0.125-0.15-")


# --- running ---------------------------------------------------------------------------------


def test_sweep_runs_every_point_once_and_reuses_on_rerun(tmp_path):
    spec = _spec(tmp_path, seeds=(0, 1))
    first = run_sweep(spec, log=lambda _: None, progress=False)
    assert first.ran == ["0.5/0", "0.5/1", "0.75/0", "0.75/1"] and first.failed == []
    df = read_results(tmp_path / "results")
    assert set(df["sweep"]) == {"mask-ratio"}
    assert sorted(set(df["mask_ratio"])) == [0.5, 0.75]
    assert sorted(set(df["seed"])) == [0, 1]
    assert (df["pretrain_gflops"] > 0).all() and (df["gflops_per_image"] > 0).all()
    # pretrain_gflops = GFLOPs per image x images seen (2 steps of 64)
    row = df.iloc[0]
    assert row["pretrain_gflops"] == pytest.approx(row["gflops_per_image"] * 128, rel=0.01)
    counts = _point_counts(tmp_path / "results")
    assert len({key[0] for key in counts}) == 4 and set(counts.values()) == {1}
    manifest = [json.loads(line) for line in
                (tmp_path / "results" / MANIFEST).read_text().splitlines()]
    assert [(m["value"], m["seed"], m["status"]) for m in manifest] == [
        (0.5, 0, "ok"), (0.5, 1, "ok"), (0.75, 0, "ok"), (0.75, 1, "ok")]
    assert all(Path(m["run_dir"], "metrics.jsonl").is_file() for m in manifest)
    assert manifest[0]["command"] == "mae-bench sweep test" and manifest[0]["versions"]["torch"]

    summary = sweep_summary(spec, plan_points(spec))
    assert list(summary.index) == ["0.5", "0.75"] and list(summary.columns) == [
        "knn top-1 (k=20)"]
    top1 = df[(df["metric"] == "top1") & (df["k"] == 20) & (df["mask_ratio"] == 0.75)]["value"]
    assert summary.loc["0.75", "knn top-1 (k=20)"] == (
        f"{top1.mean():.2f} ± {top1.std(ddof=1):.2f} (2)")

    again = run_sweep(spec, log=lambda _: None, progress=False)
    assert again.ran == [] and [s.status for s in again.states] == ["done"] * 4
    assert _point_counts(tmp_path / "results") == counts
    # a new protocol evaluates the finished runs without training them again
    stamp = (plan_points(spec)[0].run_dir / "checkpoint.pt").stat().st_mtime_ns
    more = run_sweep(_spec(tmp_path, seeds=(0, 1), protocols=("knn", "linear")),
                     log=lambda _: None, progress=False)
    assert len(more.ran) == 4
    assert (plan_points(spec)[0].run_dir / "checkpoint.pt").stat().st_mtime_ns == stamp
    assert set(_point_counts(tmp_path / "results").values()) == {1}


def test_failing_point_is_recorded_and_the_others_finish(tmp_path, monkeypatch):
    import mae_bench.methods.engine as engine

    real = engine.pretrain

    def pretrain(cfg, run_dir, **kw):
        if cfg.mae.mask_ratio == 0.5:
            raise TrainingError("loss is nan at step 1 <diverged>")
        return real(cfg, run_dir, **kw)

    monkeypatch.setattr(engine, "pretrain", pretrain)
    spec = _spec(tmp_path, values=("0.25", "0.5", "0.75"))
    out = run_sweep(spec, log=lambda _: None, progress=False)
    assert out.failed == ["mask-ratio=0.5 seed 0: TrainingError: loss is nan at step 1 "
                          "<diverged>"]
    df = read_results(tmp_path / "results")
    bad = df[df["status"] == "failed"]
    assert len(bad) == 1 and bad.iloc[0]["mask_ratio"] == 0.5 and bad.iloc[0]["sweep"] == \
        "mask-ratio"
    assert "loss is nan" in bad.iloc[0]["error"]
    assert sorted(set(df.loc[df["status"] == "ok", "mask_ratio"])) == [0.25, 0.75]

    # re-running keeps the failure (no duplicate) ...
    assert [s.status for s in point_states(spec, plan_points(spec))] == ["done", "failed",
                                                                         "done"]
    run_sweep(spec, log=lambda _: None, progress=False)
    assert len(read_results(tmp_path / "results")) == len(df)
    # ... until asked to retry it, which (now that it trains) adds its ok rows
    monkeypatch.setattr(engine, "pretrain", real)
    retry = run_sweep(_spec(tmp_path, values=("0.25", "0.5", "0.75"), retry_failed=True),
                      log=lambda _: None, progress=False)
    assert retry.ran == ["0.5/0"] and retry.failed == []
    df = read_results(tmp_path / "results")
    assert 0.5 in set(df.loc[df["status"] == "ok", "mask_ratio"])


def _fill_disk_under(monkeypatch, path: Path) -> None:
    """From now on ``path`` (an existing file) is on a disk that fills up: the first
    ``os.write`` to it writes half of its bytes (a short write), every later one raises
    ENOSPC."""
    real, inode, calls = os.write, path.stat().st_ino, []

    def write(fd: int, data) -> int:
        if os.fstat(fd).st_ino != inode:
            return real(fd, data)
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, bytes(data[: len(data) // 2]))

    monkeypatch.setattr(os, "write", write)


def test_a_full_store_stops_the_sweep_in_one_line_and_the_rerun_finishes(tmp_path, monkeypatch):
    spec = _spec(tmp_path)
    store = tmp_path / "results" / "results.jsonl"
    before: list[bytes] = []

    def log(line: str) -> None:
        if line.startswith("[2/2]"):  # the first point's rows are in: now the disk fills up
            before.append(store.read_bytes())
            _fill_disk_under(monkeypatch, store)

    with pytest.raises(StoreWriteError) as err:  # run_eval's, passed on by the sweep
        run_sweep(spec, log=log, progress=False)
    message = str(err.value)
    assert message == (f"--results-dir {spec.results_dir}: the rows could not be written (No "
                       "space left on device); the sweep stopped at mask-ratio=0.75 seed 0: "
                       "re-run it once the store can be written (finished points are skipped)")
    assert store.read_bytes() == before[0]  # none of the second point's rows, no torn line
    monkeypatch.undo()
    assert [s.status for s in point_states(spec, plan_points(spec))] == ["done", "trained"]
    again = run_sweep(spec, log=lambda _: None, progress=False)
    assert again.ran == ["0.75/0"] and again.failed == []
    counts = _point_counts(tmp_path / "results")
    assert len({key[0] for key in counts}) == 2 and set(counts.values()) == {1}
    manifest = [json.loads(line) for line in
                (tmp_path / "results" / MANIFEST).read_text().splitlines()]
    assert [(m["value"], m["status"]) for m in manifest] == [(0.5, "ok"), (0.75, "ok")]


def test_a_lost_manifest_line_is_written_again_without_rerunning_the_point(tmp_path):
    spec = _spec(tmp_path)
    run_sweep(spec, log=lambda _: None, progress=False)
    manifest = tmp_path / "results" / MANIFEST
    first, second = manifest.read_text().splitlines()
    manifest.write_text(second + "\n")  # killed between the first point's rows and its line
    rows = (tmp_path / "results" / "results.jsonl").read_bytes()
    stamp = (plan_points(spec)[0].run_dir / "checkpoint.pt").stat().st_mtime_ns
    said: list[str] = []
    again = run_sweep(spec, log=said.append, progress=False)
    assert again.ran == [] and (tmp_path / "results" / "results.jsonl").read_bytes() == rows
    assert (plan_points(spec)[0].run_dir / "checkpoint.pt").stat().st_mtime_ns == stamp
    assert said[0] == (f"[1/2] mask-ratio=0.5 seed 0: done, skipped (its {MANIFEST} line was "
                       "missing: written now)")
    assert said[1] == "[2/2] mask-ratio=0.75 seed 0: done, skipped"
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    old = json.loads(first)
    assert [(m["run_id"], m["value"], m["status"]) for m in lines] == [
        (json.loads(second)["run_id"], 0.75, "ok"), (old["run_id"], 0.5, "ok")]
    assert lines[1]["run_dir"] == old["run_dir"] and lines[1]["versions"]["torch"]
    run_sweep(spec, log=lambda _: None, progress=False)  # repaired once, not on every re-run
    assert len(manifest.read_text().splitlines()) == 2


def test_a_manifest_write_on_a_full_disk_is_one_line_and_repaired_later(tmp_path, monkeypatch):
    spec = _spec(tmp_path, values=("0.5",))
    manifest = tmp_path / "results" / MANIFEST
    manifest.parent.mkdir(parents=True)
    manifest.write_bytes(b"")
    _fill_disk_under(monkeypatch, manifest)
    with pytest.raises(StoreWriteError) as err:  # a ConfigError: one line, exit 2
        run_sweep(spec, log=lambda _: None, progress=False)
    assert str(err.value) == (f"--results-dir {spec.results_dir}: the rows could not be written "
                              "(No space left on device); the sweep stopped at mask-ratio=0.5 "
                              "seed 0: re-run it once the store can be written (finished points "
                              "are skipped)")
    assert manifest.read_bytes() == b""  # no torn line
    monkeypatch.undo()
    again = run_sweep(spec, log=lambda _: None, progress=False)
    assert again.ran == []  # its rows were written: only the line was missing
    (line,) = manifest.read_text().splitlines()
    assert json.loads(line)["status"] == "ok"


@pytest.mark.multiprocess
def test_killed_sweep_resumes_without_duplicates(tmp_path):
    """Kill a real `mae-bench sweep` process once its first point's rows are written, re-run
    it: every point is then in the store exactly once."""
    args = ["sweep", "mask-ratio", "--values", "0.25,0.5,0.75", "--arch", "vit_micro_patch2",
            "--epochs", "0.1", "--batch-size", "64", "--protocols", "knn", "--no-progress",
            "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results"),
            "--cache-dir", str(tmp_path / "cache"), "--no-references"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mae_bench", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = tmp_path / "results" / "results.jsonl"
    deadline = time.monotonic() + 120
    while not store.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
    killed = read_results(tmp_path / "results")
    assert set(killed["mask_ratio"]) == {0.25}  # only the first point got its rows

    done = subprocess.run([sys.executable, "-m", "mae_bench", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "skipped" in done.stderr  # the first point was not run again
    counts = _point_counts(tmp_path / "results")
    assert len({key[0] for key in counts}) == 3 and set(counts.values()) == {1}


# --- the command line ------------------------------------------------------------------------


def test_dry_run_lists_points_and_writes_nothing(tmp_path, monkeypatch, capsys):
    run_sweep(_spec(tmp_path, values=("0.5",)), log=lambda _: None, progress=False)
    before = (tmp_path / "results" / "results.jsonl").read_bytes()
    code, out, _ = run_cli(monkeypatch, capsys, "sweep", "mask-ratio", "--values", "0.5,0.75",
                           "--arch", "vit_micro_patch2", "--epochs", "0.1", "--batch-size", "64",
                           "--protocols", "knn", "--runs-dir", str(tmp_path / "runs"),
                           "--results-dir", str(tmp_path / "results"), "--dry-run")
    assert code == 0
    assert "1 done, 1 to run" in out
    assert out.count("to do") == 1 and out.count("done") >= 2
    assert (tmp_path / "results" / "results.jsonl").read_bytes() == before
    assert len(list((tmp_path / "runs").rglob("summary.json"))) == 1


@pytest.mark.parametrize(("args", "message"), [
    (["sweep", "size"], "unknown sweep knob 'size'"),
    (["sweep", "mask-ratio", "--seeds", "0,a"], "--seeds takes whole numbers"),
    (["sweep", "mask-ratio", "--values", "0.5,2"], "mask-ratio values must be in (0, 1)"),
    (["sweep", "mask-ratio", "--dataset", "imagenet22k"], "unknown dataset"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2  # one line (rich may wrap it)
    assert list(tmp_path.iterdir()) == []


def test_report_counts_a_retried_failure_once(tmp_path, monkeypatch):
    """After --retry-failed succeeds, the store keeps the old failed row but the report's
    table shows the point as ok, without "1 failed"."""
    import mae_bench.methods.engine as engine
    from mae_bench.app.report import build_report

    real = engine.pretrain

    def pretrain(cfg, run_dir, **kw):
        raise TrainingError("loss is nan at step 1")

    monkeypatch.setattr(engine, "pretrain", pretrain)
    spec = _spec(tmp_path, values=("0.5",))
    run_sweep(spec, log=lambda _: None, progress=False)
    monkeypatch.setattr(engine, "pretrain", real)
    run_sweep(_spec(tmp_path, values=("0.5",), retry_failed=True), log=lambda _: None,
              progress=False)
    df = read_results(tmp_path / "results")
    assert set(df["status"]) == {"ok", "failed"}
    out = build_report(tmp_path / "results", tmp_path / "report", grids=False)
    text = out.markdown.read_text()
    assert "(n=1)" in text and "failed)" not in text and "Failed runs" not in text


# --- references and provenance (issue 28, item 17) ---------------------------------------------


def test_versions_name_the_processor_from_cpuinfo():
    """platform.processor() is empty on Linux: the manifest names the CPU model instead."""
    from mae_bench.app.sweep import versions

    shown = versions()["processor"]
    assert shown not in ("", "?")
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next(line.split(":", 1)[1].strip() for line in
                     cpuinfo.read_text().splitlines() if line.startswith("model name"))
        assert shown.startswith(model)


def test_sweep_evaluates_the_references_once_and_shows_them(tmp_path):
    """A random encoder of the sweep's architecture (per seed) and pixels (once), with the same
    protocol; a re-run adds nothing; the summary and the report show them as reference rows."""
    from mae_bench.app.report import build_report

    spec = _spec(tmp_path, values=("0.5",), seeds=(0, 1), references=True)
    run_sweep(spec, log=lambda _: None, progress=False)
    df = read_results(tmp_path / "results")
    refs = df[df["method"].isin(["random", "pixels"])]
    assert set(refs["sweep"]) == {"mask-ratio"} and set(refs["protocol"]) == {"knn"}
    top1 = refs[(refs["metric"] == "top1") & (refs["k"] == 20)]
    assert sorted(zip(top1["method"], top1["seed"], strict=True)) == [("pixels", 0), ("random", 0),
                                                          ("random", 1)]
    assert set(top1.loc[top1["method"] == "random", "arch"]) == {"vit_micro_patch2"}

    again = run_sweep(spec, log=lambda _: None, progress=False)
    assert again.ran == [] and len(read_results(tmp_path / "results")) == len(df)

    summary = sweep_summary(spec, plan_points(spec))
    assert list(summary.index) == ["0.5", "pixels (reference)", "random encoder (reference)"]
    random = top1[top1["method"] == "random"]["value"]
    assert summary.loc["random encoder (reference)", "knn top-1 (k=20)"] == (
        f"{random.mean():.2f} ± {random.std(ddof=1):.2f} (2)")
    md = build_report(tmp_path / "results", tmp_path / "report", grids=False
                      ).markdown.read_text()
    assert f"| random encoder (reference) | {random.mean():.2f} ± {random.std(ddof=1):.2f} " \
           "(n=2) |" in md
    assert md.count("### ") == 1  # the pixels rows make no subsection of their own
