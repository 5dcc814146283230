"""mae-bench: Masked Autoencoders and contrastive baselines on one ViT, compared fairly.

This package root is the public facade, in the application layer (``tests/test_layers.py``):
``mae_bench.evaluate(encoder, dataset=..., protocols=...)`` is the Python API
(``mae_bench/app/api.py``) and ``mae_bench.keep_freed_memory()`` the host-allocator setting
the ``mae-bench`` command makes at start (``mae_bench/training/host_memory.py``), both imported
on first use, so that ``import mae_bench.models.vit`` and every other core import stay free of
the application layer.
No module of the package imports the root.
"""

from typing import Any

from mae_bench.version import __version__

__all__ = ["__version__", "evaluate", "keep_freed_memory"]


def __getattr__(name: str) -> Any:
    if name == "evaluate":
        from mae_bench.app.api import evaluate

        return evaluate
    if name == "keep_freed_memory":
        from mae_bench.training.host_memory import keep_freed_memory

        return keep_freed_memory
    raise AttributeError(f"module 'mae_bench' has no attribute {name!r}")
