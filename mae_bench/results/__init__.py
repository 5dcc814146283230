"""Results: the append-only store of measured numbers (``store``) and the tables made from it
(``tables``: averaged over seeds, laid out, exported). The names below are the public API."""

from mae_bench.results.store import (
    COLUMNS,
    EVAL_KNOBS,
    KNOBS,
    NOT_GROUPED,
    RESULTS_FILE,
    STAT_COLUMNS,
    append_rows,
    check_writable,
    drop_superseded,
    git_sha,
    make_row,
    read_results,
    stored_evaluation,
)
from mae_bench.results.tables import (
    aggregate,
    export_table,
    format_cell,
    group_columns,
    pivot_table,
    where_equal,
)

__all__ = ["COLUMNS", "EVAL_KNOBS", "KNOBS", "NOT_GROUPED", "RESULTS_FILE", "STAT_COLUMNS",
           "aggregate", "append_rows", "check_writable", "drop_superseded", "export_table",
           "format_cell", "git_sha", "group_columns", "make_row", "pivot_table", "read_results",
           "stored_evaluation", "where_equal"]
