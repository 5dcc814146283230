"""Region-of-interest JPEG decoding for the DataLoader workers: only the crop box is decoded.

A worker of the ``device-resize`` and ``workers`` pipelines (``mae_bench.data.pipeline``) needs
each view's crop box, on average about half of the image. libjpeg-turbo can decode just that
(``jpeg_crop_scanline`` + ``jpeg_skip_scanlines``: the inverse DCT, upsampling and colour
conversion of the box's columns and rows only, and nothing below its last row), but neither PIL
nor torchvision exposes it. ``jpeg_region.c`` does, in about a hundred lines of C compiled here
on first use (``cc``, and libjpeg's ``jpeglib.h``: Debian's ``libjpeg-dev``) against Pillow's
own libjpeg-turbo (or the system's), cached under ``<cache>/native`` and loaded with ctypes.

The pixels are exactly those of ``torchvision.io.decode_jpeg`` cut to the box (a self-test on
load checks it, and tests/test_jpeg_region.py on photographs); when the C part cannot be built,
loaded or fails its self-test, the workers decode whole images with torchvision as before, and
``describe()`` says why. ``MAE_BENCH_JPEG_DECODER=torchvision`` forces that path (the data-path
benchmark uses it to compare both).
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import logging
import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger("mae_bench.data")  # one logger name for the whole package

SOURCE = Path(__file__).with_name("jpeg_region.c")
ENV = "MAE_BENCH_JPEG_DECODER"  # "torchvision": never the region decoder
_MSG_LEN = 200  # MB_MSG_LEN in the C source
_MARGIN = 66  # per row: the box's widening to whole iMCUs (< 32 px each side) and one pixel


class RegionDecoder:
    """The loaded C library. ``header`` and ``decode`` return None when libjpeg refuses the
    file (broken, truncated, CMYK, not a JPEG): the caller decodes it the ordinary way."""

    def __init__(self, lib: ctypes.CDLL, libjpeg: str):
        self.libjpeg = libjpeg  # what it was linked against, for describe()
        self._header = lib.mb_jpeg_header
        self._header.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.POINTER(ctypes.c_int),
                                 ctypes.POINTER(ctypes.c_int), ctypes.c_char_p]
        self._header.restype = ctypes.c_int
        self._decode = lib.mb_jpeg_decode
        self._decode.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int,
                                 ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                 ctypes.c_ulong, ctypes.POINTER(ctypes.c_int),
                                 ctypes.POINTER(ctypes.c_int), ctypes.c_char_p]
        self._decode.restype = ctypes.c_int

    def header(self, data: bytes) -> tuple[int, int] | None:
        """(height, width) from the header."""
        h, w, msg = ctypes.c_int(), ctypes.c_int(), ctypes.create_string_buffer(_MSG_LEN)
        if self._header(data, len(data), ctypes.byref(h), ctypes.byref(w), msg) != 0:
            return None
        return h.value, w.value

    def decode(self, data: bytes, box: tuple[int, int, int, int], scale: int = 1) -> Tensor | None:
        """uint8 [3, h, w] RGB: the box (top, left, h, w), in the pixels of the image decoded at
        1/``scale`` (1, 2, 4 or 8), as a view into the decoded rows (channels last in memory)."""
        top, left, h, w = box
        buf = torch.empty(h * (w + _MARGIN) * 3, dtype=torch.uint8)
        x0, cols = ctypes.c_int(), ctypes.c_int()
        msg = ctypes.create_string_buffer(_MSG_LEN)
        if self._decode(data, len(data), scale, top, left, h, w, buf.data_ptr(), buf.numel(),
                        ctypes.byref(x0), ctypes.byref(cols), msg) != 0:
            return None
        rows = buf[:h * cols.value * 3].view(h, cols.value, 3)
        return rows[:, left - x0.value:left - x0.value + w].permute(2, 0, 1)


_loaded: RegionDecoder | None = None
_why_not: str | None = None  # why there is no region decoder, once load() has run


def load() -> RegionDecoder | None:
    """The region decoder, built and self-tested on the first call of the process (a forked
    DataLoader worker inherits it); None, with the reason in ``describe()``, when it cannot be."""
    global _loaded, _why_not
    if os.environ.get(ENV, "").strip().lower() == "torchvision":
        return None
    if _loaded is not None or _why_not is not None:
        return _loaded
    try:
        _loaded = _self_tested(_build_and_load())
    except _Unavailable as e:
        _why_not = str(e)
        log.info("JPEG region decoder unavailable (%s): workers decode whole images with "
                 "torchvision", e)
    return _loaded


def describe() -> str:
    """Which JPEG decoder the workers use, in words (for run.json and the data benchmark)."""
    if os.environ.get(ENV, "").strip().lower() == "torchvision":
        return f"torchvision.io.decode_jpeg (whole images; {ENV}=torchvision)"
    decoder = load()
    if decoder is None:
        return f"torchvision.io.decode_jpeg (whole images; region decoder unavailable: {_why_not})"
    return f"libjpeg-turbo region decode (crop boxes only; {decoder.libjpeg})"


class _Unavailable(Exception):
    pass


def _libjpeg() -> tuple[list[str], str]:
    """The link arguments and a description: Pillow's bundled libjpeg-turbo when its wheel has
    one with jpeg_crop_scanline (it is recent, and there on every machine with Pillow), else the
    system's ``-ljpeg``."""
    import PIL

    libs = Path(PIL.__file__).parent.parent / "pillow.libs"
    for path in sorted(libs.glob("libjpeg*.so*")):
        try:
            if hasattr(ctypes.CDLL(str(path)), "jpeg_crop_scanline"):
                return [str(path), f"-Wl,-rpath,{path.parent}"], f"Pillow's {path.name}"
        except OSError:
            continue
    return ["-ljpeg"], "the system's libjpeg"


def _build_and_load() -> RegionDecoder:
    from mae_bench.data.registry import _default_cache_dir

    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        raise _Unavailable("no C compiler (cc) on PATH")
    link, libjpeg = _libjpeg()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + "\0".join([cc, *link, sysconfig.get_platform()]).encode())
    target = _default_cache_dir() / "native" / f"jpeg_region-{key.hexdigest()[:16]}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
        except OSError as e:
            raise _Unavailable(f"cannot write to {target.parent}: {e.strerror}") from None
        try:
            done = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp, str(SOURCE), *link],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                first = (done.stderr.strip().splitlines() or ["no message"])[0]
                raise _Unavailable(f"compiling {SOURCE.name} failed: {first}")
            os.replace(tmp, target)  # atomic: a concurrent build (torchrun ranks) is harmless
        except subprocess.TimeoutExpired:
            raise _Unavailable(f"compiling {SOURCE.name} took over 120 s") from None
        finally:
            Path(tmp).unlink(missing_ok=True)
    try:
        return RegionDecoder(ctypes.CDLL(str(target)), libjpeg)
    except OSError as e:
        raise _Unavailable(f"loading {target.name} failed: {e}") from None


def _self_tested(decoder: RegionDecoder) -> RegionDecoder:
    """The decoder, once a small 4:2:0 JPEG decoded in a few boxes equals torchvision's whole
    decode cut to them (a libjpeg built with other defaults, or a header that does not match the
    library, would fail here rather than change the pixels)."""
    from PIL import Image

    from mae_bench.data.crops import decode_jpeg

    yy, xx = np.mgrid[0:61, 0:83]
    rgb = np.stack([(xx * 3) % 256, (yy * 4) % 256, ((xx + yy) * 5) % 256], -1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=85, subsampling=2)
    data = out.getvalue()
    full = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    if decoder.header(data) != (61, 83):
        raise _Unavailable("self-test failed: wrong header")
    for top, left, h, w in [(0, 0, 61, 83), (5, 17, 40, 33), (16, 1, 45, 82), (60, 82, 1, 1)]:
        got = decoder.decode(data, (top, left, h, w))
        if got is None or not torch.equal(got, full[:, top:top + h, left:left + w]):
            raise _Unavailable("self-test failed: pixels differ from torchvision's decode")
    return decoder
