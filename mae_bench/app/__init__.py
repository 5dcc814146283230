"""The application layer: what the commands do, above the protocols.

compare (pretrain every method, evaluate, one table), sweep and sweep_knobs (the MAE ablations),
evaluation (a checkpoint through the protocols into result rows), report and report_doc
(Markdown / HTML reports), speed, speed_run and speed_eval (throughput, FLOPs, MFU), visualize
(MAE reconstructions). ``mae_bench.cli`` parses arguments and calls these.
"""
