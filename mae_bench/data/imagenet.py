"""imagenet, imagenet100, imagenette: ImageNet-style class folders of known classes.

The layout is imagefolder's (``image_splits``): train/ and val/ (or test/), each a folder of class
folders named by WordNet id (wnid) or a .tar of one. val/ is the test split and wins over a test/,
which in ImageNet's releases holds unlabelled images. Unlike imagefolder, the classes are fixed:
a folder of other classes is a one-line error, and label ids follow the sorted wnids. That is
torchvision ImageFolder's order and ILSVRC-2012's class index, so a label means the same here as
in timm, torchvision and the released checkpoints (0 is n01440764, tench). Images are normalised
with ImageNet's mean and std, as every published recipe does, not with the folder's own
statistics.

imagenet100 reads a folder of exactly its 100 classes or all of ImageNet-1k, whose other 900
class folders are left out undecoded, so nobody has to copy a subset. Splits too large for memory
(all but Imagenette at 160 or 320 px) are streamed from the files by DataLoader workers.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from mae_bench.data.classes import IMAGENET_WNIDS
from mae_bench.data.datasets import AnyDataset, ArrayDataset, StreamingDataset
from mae_bench.data.image_splits import _find_image_splits, _load_image_split
from mae_bench.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from mae_bench.data.info import DatasetInfo
from mae_bench.data.registry import _Options, register_dataset

# ImageNet-100 as CMC defined it (Tian et al. 2019), the subset solo-learn and others train on:
# vturrisi/solo-learn, solo/data/dataset_subset/imagenet100_classes.txt (the same ids in the same
# order as HobbitLong/CMC, imagenet100.txt). The string is that file; the tuple is sorted, so
# label i is IMAGENET100_WNIDS[i].
IMAGENET100_WNIDS = tuple(sorted(
    "n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245 "
    "n01773797 n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 "
    "n03530642 n04435653 n02086910 n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 "
    "n04493381 n02109047 n04111531 n02877765 n04429376 n02009229 n01978455 n02106550 n01820546 "
    "n01692333 n07714571 n02974003 n02114855 n03785016 n03764736 n03775546 n02087046 n07836838 "
    "n04099969 n04592741 n03891251 n02701002 n03379051 n02259212 n07715103 n03947888 n04026417 "
    "n02326432 n03637318 n01980166 n02113799 n02086240 n03903868 n02483362 n04127249 n02089973 "
    "n03017168 n02093428 n02804414 n02396427 n04418357 n02172182 n01729322 n02113978 n03787032 "
    "n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029 n03837869 "
    "n03494278 n04136333 n03794056 n03492542 n02018207 n04067472 n03930630 n03584829 n02123045 "
    "n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 n02108089 n03424325 n01855672 "
    "n02090622".split()
))

# fast.ai's Imagenette (github.com/fastai/imagenette): 10 easily told apart ImageNet classes, in
# label order, with the names fast.ai gives them. Parachute is n03888257 (n03888605 is "parallel
# bars", not in Imagenette).
IMAGENETTE_CLASSES = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888257": "parachute",
}

_LAYOUT = (
    "train/ and val/ (or test/) of {} class folders named by WordNet id ({}, ...), or "
    ".tar/.tar.gz archives of them"
)
_NORMALISATION = (
    "normalisation: ImageNet's mean and std, as the published recipes and released models use, "
    "not the folder's own statistics (which imagefolder computes)"
)
_STREAMING = (
    "reading: splits too large for memory are streamed from the files, one image at a time "
    "in DataLoader workers (--num-workers), not decoded into memory as a whole; "
    "`mae-bench shard DIR --out SHARDS` turns a class-folder tree into tar shards read "
    "sequentially"
)


def _order_note(classes: tuple[str, ...]) -> str:
    return (
        f"label ids: the {len(classes)} wnids in sorted order (0 = {classes[0]}), torchvision "
        "ImageFolder's convention, so labels match other tools' and released models'"
    )


def _load_preset(
    classes: tuple[str, ...], from_superset: bool, info: DatasetInfo, split: str,
    found: dict[str, Any], opts: _Options,
) -> AnyDataset:
    """One split: decoded into memory (through the cache) or streamed when too large. The
    registry entry is kept: 224 px training size and ImageNet's statistics, whatever the files'
    size."""
    result = _load_image_split(info, found[split], classes, opts, from_superset)
    if isinstance(result, StreamingDataset):
        return result
    return ArrayDataset(result.images, result.labels, result.classes, info, result.bad_images)


def _register(info: DatasetInfo, classes: tuple[str, ...], from_superset: bool = False) -> None:
    register_dataset(
        info,
        find=lambda root: _find_image_splits(root, test_names=("val", "test")),
        load=lambda entry, split, found, opts: _load_preset(
            classes, from_superset, entry, split, found, opts),
        expected=f"train/ and val/ (or test/) with the {len(classes)} {info.name} class folders, "
        "or train.tar and val.tar",
    )


def register() -> None:
    """Add this module's data sets to the registry (called once, by ``mae_bench.data.catalog``)."""
    preset = partial(DatasetInfo, channels=3, img_size=224, mean=IMAGENET_MEAN,
                     std=IMAGENET_STD, splits=("train", "test"), needs_data_dir=True)
    _register(preset(
        name="imagenet",
        description="ImageNet-1k (ILSVRC-2012): 1,281,167 train / 50,000 val images, 1,000 "
        "classes",
        num_classes=len(IMAGENET_WNIDS),
        formats=_LAYOUT.format("1,000", IMAGENET_WNIDS[0]),
        how_to_get="ILSVRC-2012 from https://image-net.org/download-images.php (needs an "
        "account): untar the train tar and its 1,000 class tars into DIR/train/<wnid>/, the val "
        "tar into DIR/val/, and sort val/ into class folders with the usual valprep.sh "
        "(pytorch/examples imagenet/extract_ILSVRC.sh does both)",
        notes=(
            _order_note(IMAGENET_WNIDS),
            _NORMALISATION,
            _STREAMING,
            "recipe: MAE's ImageNet-1k pretraining (He et al. 2022), facebookresearch/mae "
            "PRETRAIN.md (ViT-L/16 by default, mask ratio 0.75, norm_pix_loss, 800 epochs with "
            "40 of warm-up, batch 4096, AdamW lr 1.5e-4 x batch / 256, weight decay 0.05), then "
            "FINETUNE.md there for fine-tuning and the linear probe",
        ),
    ), IMAGENET_WNIDS)
    _register(preset(
        name="imagenet100",
        description="ImageNet-100: CMC's 100-class subset of ImageNet-1k (about 127k train / "
        "5,000 val images)",
        num_classes=len(IMAGENET100_WNIDS),
        formats=_LAYOUT.format("100", IMAGENET100_WNIDS[0])
        + "; or all of ImageNet-1k, from which the 100 are taken",
        how_to_get="point --data-dir at ImageNet-1k (see imagenet; the other 900 classes are "
        "left out), or at a copy with only the 100 class folders in train/ and val/",
        notes=(
            _order_note(IMAGENET100_WNIDS),
            "class list: vturrisi/solo-learn solo/data/dataset_subset/imagenet100_classes.txt "
            "(= HobbitLong/CMC imagenet100.txt)",
            _NORMALISATION,
            _STREAMING,
            "recipes: solo-learn's ImageNet-100 configs, scripts/pretrain/imagenet-100/"
            "<method>.yaml in vturrisi/solo-learn (ResNet-18, 400 epochs, with its results table "
            "in the README)",
        ),
    ), IMAGENET100_WNIDS, from_superset=True)
    imagenette = tuple(IMAGENETTE_CLASSES)
    _register(preset(
        name="imagenette",
        description="Imagenette (fast.ai): 10 easy ImageNet classes, 9,469 train / 3,925 val "
        "images",
        num_classes=len(imagenette),
        formats=_LAYOUT.format("10", imagenette[0]) + " (imagenette2, -320 or -160)",
        how_to_get="https://s3.amazonaws.com/fast-ai-imageclas/imagenette2.tgz (or "
        "imagenette2-320.tgz, imagenette2-160.tgz: shorter side 320 or 160 px); extract it and "
        "pass the imagenette2/ folder, which holds train/ and val/",
        notes=(
            _order_note(imagenette),
            "names: " + ", ".join(f"{w} {name}" for w, name in IMAGENETTE_CLASSES.items()),
            _NORMALISATION,
            "reading: a split whose pixels fit the memory budget (4 GiB: imagenette2-160 and "
            "-320) is decoded once and cached; full size streams from the files through "
            "DataLoader workers (--num-workers)",
            "recipes: fast.ai's leaderboard, github.com/fastai/imagenette (supervised, 5 to 200 "
            "epochs at 128 to 320 px)",
        ),
    ), imagenette)
