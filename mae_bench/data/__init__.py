"""Dataset registry: what each data set is, where its files are, and how to read them.

``load_dataset(name, split, data_dir)`` returns uint8 images [N, C, H, W] with int64 labels: an
``ArrayDataset`` held in memory (small sets; image folders are decoded once and cached as .npz), or
a ``StreamingDataset`` that decodes lazily in DataLoader workers (image folders too big for memory).
Nothing here touches the network: ``DatasetInfo.how_to_get`` tells the user where data comes from.
Every problem with the user's data is a one-line ``DataError`` naming the path and the fix.

Modules, one concept each:
    info, classes       ``DatasetInfo``; class names of the built-in sets.
    registry            register a format; look a name up; ``dataset_status`` (cheap),
                        ``check_dataset`` (loads a split), ``load_dataset``.
    datasets            ``ArrayDataset`` (in memory) and ``StreamingDataset`` (decoded per item).
    index, images       where a split's images are (folders, tars); decoding them (bad images).
    cache               decoded image splits stored as .npz.
    image_splits        splits stored as class folders of images (cifar, imagefolder, imagenet).
    digits, cifar, stl10, idx (mnist, fashion-mnist), svhn, imagefolder, imagenet (imagenet,
                        imagenet100, imagenette): one format family each, with a ``register()``
                        that adds its data sets.
    shards, hf_disk     streamed splits: WebDataset tar shards (shard_writer writes them) and
                        Hugging Face ``datasets`` folders saved to disk.
    pipeline, crops     the streamed path: what DataLoader workers do with each file, and the
                        crops the training device resizes (or decodes).
    sample_photos       a folder of ImageNet-sized JPEGs made from scikit-learn's sample photos.
    catalog             the one place that registers the built-in formats, in listing order.
"""

from mae_bench.data.cache import CACHE_FORMAT, cache_writes_held
from mae_bench.data.catalog import register_builtin
from mae_bench.data.classes import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    DIGIT_CLASSES,
    FASHION_CLASSES,
    IMAGENET_WNIDS,
    STL10_CLASSES,
)
from mae_bench.data.datasets import AnyDataset, ArrayDataset, StreamingDataset
from mae_bench.data.digits import _load_digits as _load_digits  # private; tests use it
from mae_bench.data.image_splits import ARCHIVE_SUFFIXES
from mae_bench.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from mae_bench.data.images import BAD_IMAGE_LIMIT
from mae_bench.data.index import IMAGE_SUFFIXES
from mae_bench.data.info import DatasetInfo
from mae_bench.data.registry import _SYSTEM_DIRS as _SYSTEM_DIRS  # private; tests patch it
from mae_bench.data.registry import (
    DATASETS,
    DatasetCheck,
    Finder,
    Loader,
    available_splits,
    check_dataset,
    dataset_status,
    default_data_dir,
    get_dataset_info,
    load_dataset,
    register_dataset,
)

__all__ = [
    "ARCHIVE_SUFFIXES",
    "BAD_IMAGE_LIMIT",
    "CACHE_FORMAT",
    "cache_writes_held",
    "CIFAR100_CLASSES",
    "CIFAR10_CLASSES",
    "DATASETS",
    "DIGIT_CLASSES",
    "FASHION_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGENET_WNIDS",
    "IMAGE_SUFFIXES",
    "STL10_CLASSES",
    "AnyDataset",
    "ArrayDataset",
    "DatasetCheck",
    "DatasetInfo",
    "Finder",
    "Loader",
    "StreamingDataset",
    "available_splits",
    "check_dataset",
    "dataset_status",
    "default_data_dir",
    "get_dataset_info",
    "load_dataset",
    "register_dataset",
]

# The built-in data sets, in the order ``mae-bench datasets`` lists them (data/catalog.py).
register_builtin()
