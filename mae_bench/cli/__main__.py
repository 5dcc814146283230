"""``python -m mae_bench.cli``: the same CLI as ``mae-bench`` and ``python -m mae_bench``."""

from mae_bench.cli import main

if __name__ == "__main__":
    main()
