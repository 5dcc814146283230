"""Region-of-interest JPEG decoding (mae_bench/data/jpeg_region.py and .c): exactly the pixels of a
whole decode cut to the box, on photographs in the common JPEG layouts and at every DCT scale;
what libjpeg refuses comes back None (the workers then decode the file the ordinary way); without
a compiler the workers decode whole images, and say why."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mae_bench.data import jpeg_region, sample_photos
from mae_bench.data.augment import ViewSpec
from mae_bench.data.crops import decode_jpeg
from mae_bench.data.pipeline import DecodeCrop, collate_crops, sample_box

# The region decoder is compiled on first use; a machine without a C compiler or libjpeg's headers
# (Debian: libjpeg-dev) cannot build it, and its users get the whole-image decode. Any other
# failure to build or load it fails the tests below (the decoder fixture asserts it loaded).
_WHY_NOT = None if jpeg_region.load() is not None else jpeg_region.describe()
needs_toolchain = pytest.mark.skipif(
    _WHY_NOT is not None and ("no C compiler" in _WHY_NOT or "jpeglib.h" in _WHY_NOT),
    reason=f"cannot build the region decoder here: {_WHY_NOT}")


def _save(image: Image.Image, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", **kwargs)
    return out.getvalue()


@pytest.fixture(scope="module")
def jpegs() -> dict[str, bytes]:
    """scikit-learn's two photos (640 x 427) in the layouts cameras and data sets use."""
    china, flower = sample_photos._photos()
    return {
        "4:2:0": _save(china, quality=90, subsampling=2),
        "4:4:4": _save(china, quality=95, subsampling=0),
        "4:2:2": _save(flower, quality=75, subsampling=1),
        "progressive": _save(flower, quality=85, progressive=True),
        "gray": _save(china.convert("L"), quality=90),
        "odd size": _save(flower.resize((333, 211)), quality=90),  # partial MCUs at the edges
        "restart markers": _save(china, quality=80, restart_marker_rows=1),
    }


def _whole(data: bytes) -> torch.Tensor:
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def _boxes(height: int, width: int, n: int = 40) -> list[tuple[int, int, int, int]]:
    """RandomResizedCrop boxes of every size, and the corners and edges."""
    g = torch.Generator().manual_seed(0)
    boxes = [sample_box(height, width, (0.02, 1.0), (1 / 3, 3.0), g) for _ in range(n)]
    return boxes + [(0, 0, height, width), (0, 0, 1, 1), (height - 1, width - 1, 1, 1),
                    (0, width - 1, height, 1), (height - 1, 0, 1, width), (5, 3, 17, 1)]


@pytest.fixture(scope="module")
def decoder() -> jpeg_region.RegionDecoder:
    loaded = jpeg_region.load()
    assert loaded is not None, jpeg_region.describe()  # this machine has cc and jpeglib.h
    return loaded


@needs_toolchain
def test_a_region_is_the_whole_decode_cut_to_the_box(jpegs, decoder) -> None:
    """Pixel for pixel, including boxes that start or end mid-iMCU (libjpeg's fancy chroma
    upsampling would change a cropped region's edge columns without the one-pixel margin)."""
    for name, data in jpegs.items():
        whole = _whole(data)
        _, height, width = whole.shape
        assert decoder.header(data) == (height, width), name
        for top, left, h, w in _boxes(height, width):
            got = decoder.decode(data, (top, left, h, w))
            assert got is not None and got.shape == (3, h, w), (name, top, left, h, w)
            assert torch.equal(got, whole[:, top:top + h, left:left + w]), (name, top, left, h, w)


@needs_toolchain
def test_dct_scaled_regions_are_pils_draft_decode_cut_to_the_box(jpegs, decoder) -> None:
    for name in ("4:2:0", "progressive", "odd size", "gray"):
        data = jpegs[name]
        for s in (2, 4, 8):
            with Image.open(io.BytesIO(data)) as im:
                full = im.size
                im.draft("RGB", (full[0] // s, full[1] // s))
                assert im.size == (math.ceil(full[0] / s), math.ceil(full[1] / s))  # at 1/s
                scaled = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
            _, height, width = scaled.shape
            for top, left, h, w in _boxes(height, width, n=10):
                got = decoder.decode(data, (top, left, h, w), s)
                assert torch.equal(got, scaled[:, top:top + h, left:left + w]), (name, s)


@needs_toolchain
def test_what_libjpeg_refuses_comes_back_none(jpegs, decoder) -> None:
    good = jpegs["4:2:0"]
    cmyk = _save(Image.open(io.BytesIO(good)).convert("CMYK"))
    corrupt = bytearray(good)
    corrupt[len(good) // 2: len(good) // 2 + 2] = b"\xff\xd4"  # a stray marker in the data
    png = io.BytesIO()
    Image.open(io.BytesIO(good)).save(png, format="PNG")
    for data in (good[: len(good) // 2], bytes(corrupt), cmyk):
        assert decoder.header(data) is not None  # the header reads
        assert decoder.decode(data, (0, 0, 400, 600)) is None
    for data in (b"", b"\xff\xd8", png.getvalue(), b"not a jpeg at all"):
        assert decoder.header(data) is None
        assert decoder.decode(data, (0, 0, 1, 1)) is None
    for box in [(0, 0, 428, 1), (0, 600, 1, 41), (-1, 0, 1, 1), (0, 0, 0, 5)]:  # 427 x 640
        assert decoder.decode(good, box) is None


def _crops(transform: DecodeCrop, data: list[bytes]) -> list[torch.Tensor]:
    batches, _ = collate_crops([(transform(d, f"img{i}", i), i) for i, d in enumerate(data)])
    return [b.pixels for b in batches]


@needs_toolchain
@pytest.mark.parametrize("size", [224, 24])  # a full-resolution decode; DCT-scaled at 1/4, 1/8
def test_the_workers_cut_the_same_crops_with_either_decoder(jpegs, size, monkeypatch) -> None:
    """DecodeCrop with the region decoder and with whole-image decodes (torchvision, or PIL's
    DCT-scaled decode): the same boxes, the same pixels. The odd-sized images are where PIL's
    draft used to pick another scale than the one the boxes were scaled by."""
    specs = [ViewSpec(size, scale=(0.3, 1.0)), ViewSpec(size // 2, scale=(0.05, 0.4))]
    china, flower = sample_photos._photos()
    data = [*jpegs.values(), _save(china.resize((689, 460))), _save(flower.resize((917, 613)))]
    region = DecodeCrop(specs)
    region.epoch_seed = 5
    want = _crops(region, data)
    monkeypatch.setenv(jpeg_region.ENV, "torchvision")
    assert jpeg_region.load() is None
    assert jpeg_region.describe().startswith("torchvision.io.decode_jpeg (whole images; ")
    whole = DecodeCrop(specs)
    whole.epoch_seed = 5
    for a, b in zip(want, _crops(whole, data), strict=True):
        assert torch.equal(a, b)


@pytest.fixture
def fresh_state(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """The module as in a new process, with its cache in tmp_path."""
    monkeypatch.setattr(jpeg_region, "_loaded", None)
    monkeypatch.setattr(jpeg_region, "_why_not", None)
    monkeypatch.setenv("MAE_BENCH_CACHE", str(tmp_path))
    return tmp_path


@pytest.mark.multiprocess  # runs the C compiler
def test_without_a_compiler_the_workers_decode_whole_images_and_say_why(
        fresh_state, monkeypatch, jpegs) -> None:
    monkeypatch.setenv("CC", "no-such-compiler")
    assert jpeg_region.load() is None
    assert jpeg_region.describe() == ("torchvision.io.decode_jpeg (whole images; region decoder "
                                      "unavailable: no C compiler (cc) on PATH)")
    transform = DecodeCrop([ViewSpec(16)])
    sample = transform(jpegs["4:2:0"], "img", 0)
    assert sample[0][0].shape[0] == 3  # a crop, from the whole-image decode
    monkeypatch.setattr(jpeg_region, "_why_not", None)
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    assert jpeg_region.load() is None
    assert "compiling jpeg_region.c failed" in jpeg_region.describe()
    assert not list((fresh_state / "native").glob("*.so"))  # no half-written library left


@needs_toolchain
@pytest.mark.multiprocess  # runs the C compiler
def test_the_library_is_built_once_per_machine_and_reused(fresh_state, monkeypatch) -> None:
    first = jpeg_region.load()
    assert first is not None
    (built,) = (fresh_state / "native").glob("jpeg_region-*.so")
    stamp = built.stat().st_mtime_ns
    monkeypatch.setattr(jpeg_region, "_loaded", None)

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(jpeg_region.subprocess, "run", no_compiling)
    assert jpeg_region.load() is not None
    assert built.stat().st_mtime_ns == stamp
    assert jpeg_region.describe().startswith("libjpeg-turbo region decode (crop boxes only; ")
