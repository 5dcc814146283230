"""``python -m mae_bench ...`` is the same CLI as ``mae-bench`` (torchrun needs this form)."""

from mae_bench.cli import main

main()
