"""The built-in data sets, registered in one place.

``register_builtin`` adds every format module's data sets to the registry in this order, which is
the order of ``mae-bench datasets`` and of the valid names quoted in errors. A format module
only defines its data sets; nothing is registered as a side effect of importing it.
"""

from __future__ import annotations

from mae_bench.data import cifar, digits, hf_disk, idx, imagefolder, imagenet, shards, stl10, svhn
from mae_bench.data.registry import DATASETS

BUILTIN_FORMATS = (digits, cifar, stl10, idx, svhn, imagefolder, imagenet, shards, hf_disk)


def register_builtin() -> None:
    """Register the built-in data sets (once; later calls do nothing)."""
    if DATASETS:
        return
    for module in BUILTIN_FORMATS:
        module.register()
