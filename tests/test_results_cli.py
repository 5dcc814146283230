"""``mae-bench results`` on a terminal: a wide pivot table stays readable at 80 columns."""

from __future__ import annotations

from cli_helpers import run_cli

from mae_bench.results import append_rows, make_row

# The k-NN protocol's metrics: at 80 columns three of them used to read "knn recall…".
KNN_METRICS = [("top1", 10), ("top5", 10), ("top1", 20), ("top5", 20), ("recall@1", None),
               ("recall@5", None), ("recall@10", None), ("map@r", None)]


def _store(path) -> None:
    """12 encoders (more rows than result columns: the table is not turned on its side)."""
    rows = []
    encoders = [(m, p) for m in ("mae", "simclr", "mocov3", "byol", "dino", "random")
                for p in ("cls", "mean")]
    for i, (method, pool) in enumerate(encoders):
        common = dict(run_id=f"{method}-0", method=method, arch="vit_mini_patch4",
                      dataset="cifar10", pool=pool, seed=0)
        rows += [make_row(protocol="knn", metric=metric, k=k, value=40.0 + i + j / 100,
                          **common) for j, (metric, k) in enumerate(KNN_METRICS)]
        rows += [make_row(protocol="linear", metric=m, value=70.5 + i, **common)
                 for m in ("top1", "top5")]
    append_rows(path, rows)


def test_every_column_label_reads_whole_at_80_columns(tmp_path, monkeypatch, capsys):
    from mae_bench.cli import common

    _store(tmp_path)
    monkeypatch.setattr(common.out, "_width", 80)
    code, out, _ = run_cli(monkeypatch, capsys, "results", "--results-dir", str(tmp_path))
    assert code == 0
    assert "…" not in out  # nothing cut: every label and cell reads whole
    assert max(len(line) for line in out.splitlines()) <= 80
    header_words = " ".join(out.split())
    for label in ("recall@1", "recall@5", "recall@10", "map@r", "vit_mini_patch4"):
        assert f" {label} " in header_words
    # every k-NN value is shown, once
    assert all(out.count(f"{40 + i + j / 100:.2f}") == 1 for i in range(12)
               for j in range(len(KNN_METRICS)))
