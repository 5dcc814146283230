"""NVIDIA DALI as the device-side decoder of the ``dali`` pipeline (an optional backend).

The workers do what they do for ``device-decode`` (read the file and its header, draw every
view's box and flip with torchvision's draws: ``pipeline.ReadBoxes``); the training process then
hands each view's JPEG bytes and boxes to a DALI pipeline that decodes only the box
(``fn.decoders.image_slice``: nvJPEG through nvImageCodec with ``device="mixed"``
on a GPU; libjpeg-turbo on CPU threads with ``device_id=None`` on a CPU) and resizes it to the
view's size with an antialiased kernel of the same family (``fn.resize``). The boxes, flips, data
order and resume are therefore those of every other pipeline; the decoded boxes are exactly
libjpeg's pixels, and DALI's resize differs from torchvision's by interpolation detail (a mean of
about a tenth of a level; tests/test_dali.py measures it).

A batch DALI refuses (a file broken past its header; a non-JPEG image among them) is decoded the
``device-decode`` way instead, with its usual warning and replacement of a broken file. EXIF
orientation is ignored, as everywhere else in mae-bench (torchvision's and PIL's decoders do not
apply it either).

Install: ``pip install 'mae-bench[dali]'`` (``nvidia-dali-cuda120``; Linux only). DALI's CPU
pipelines need no GPU, CUDA runtime or driver.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mae_bench.errors import DataError

log = logging.getLogger("mae_bench.data")  # one logger name for the whole package

INSTALL = "pip install 'mae-bench[dali]' (NVIDIA DALI, Linux)"


def check_installed() -> str:
    """DALI's version.

    Raises:
        DataError: DALI cannot be imported (one line, with how to install it).
    """
    try:
        import nvidia.dali as dali
    except ImportError:
        raise DataError(f"--pipeline dali needs NVIDIA DALI, which is not installed: "
                        f"{INSTALL}") from None
    except Exception as e:  # a broken install failing to load its libraries
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"--pipeline dali: NVIDIA DALI failed to load ({type(e).__name__}: "
                        f"{first[:200]}); reinstall it: {INSTALL}") from None
    return str(dali.__version__)


@dataclass(frozen=True)
class _Key:
    device: str  # "cpu" or "cuda:N"
    size: int
    interpolation: str
    max_batch: int
    threads: int


class _Decoder:
    """One built DALI pipeline: JPEG bytes and a box per image -> uint8 [B, 3, size, size]."""

    def __init__(self, key: _Key):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        cuda = key.device.startswith("cuda")
        self.key = key
        device_id = torch.device(key.device).index if cuda else None  # None: a CPU pipeline
        # Fed and run one batch at a time, in step with training: no prefetching queue.
        self.pipe = Pipeline(batch_size=key.max_batch, num_threads=key.threads, device_id=device_id,
                             prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        interp = types.INTERP_CUBIC if key.interpolation == "bicubic" else types.INTERP_LINEAR
        with self.pipe:
            files = fn.external_source(name="files", dtype=types.UINT8, ndim=1)
            anchor = fn.external_source(name="anchor", dtype=types.INT32, ndim=1)
            shape = fn.external_source(name="shape", dtype=types.INT32, ndim=1)
            crops = fn.decoders.image_slice(
                files, anchor, shape, device="mixed" if cuda else "cpu", output_type=types.RGB,
                axis_names="HW", normalized_anchor=False, normalized_shape=False,
                adjust_orientation=False)
            self.pipe.set_outputs(fn.resize(crops, size=[key.size, key.size], interp_type=interp,
                                            antialias=True))
        self.pipe.build()

    def __call__(self, files: list[np.ndarray], boxes: np.ndarray) -> Tensor:
        """uint8 [B, 3, size, size] on the key's device; boxes: int [B, 4] (top, left, h, w)."""
        self.pipe.feed_input("files", files)
        self.pipe.feed_input("anchor", [np.ascontiguousarray(b[:2], dtype=np.int32)
                                        for b in boxes])
        self.pipe.feed_input("shape", [np.ascontiguousarray(b[2:], dtype=np.int32)
                                       for b in boxes])
        (out,) = self.pipe.run()
        if self.key.device.startswith("cuda"):
            from nvidia.dali.plugin.pytorch import feed_ndarray

            dense = out.as_tensor()
            images = torch.empty(dense.shape(), dtype=torch.uint8, device=self.key.device)
            feed_ndarray(dense, images, cuda_stream=torch.cuda.current_stream(images.device))
        else:
            images = torch.from_numpy(out.as_array())
        return images.permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW


_decoders: dict[tuple, _Decoder] = {}


def _decoder(device: torch.device, size: int, interpolation: str, batch: int) -> _Decoder:
    """A cached pipeline for this device, size and kernel holding at least ``batch`` images
    (rebuilt larger when a larger batch comes)."""
    where = "cpu" if device.type != "cuda" else f"cuda:{device.index or 0}"
    threads = max(1, torch.get_num_threads())
    base = (where, size, interpolation, threads)
    held = _decoders.get(base)
    if held is None or held.key.max_batch < batch:
        held = _decoders[base] = _Decoder(_Key(where, size, interpolation, batch, threads))
    return held


def decode_resize(batch: Any, v: int, size: int, interpolation: str) -> Tensor | None:
    """View ``v`` of an ``crops.EncodedBatch`` decoded and resized by DALI, flipped where drawn:
    uint8 [B, 3, size, size] on the batch's device; None when the batch holds a non-JPEG image
    or DALI refuses a file (warned): the caller decodes it the ``device-decode`` way."""
    shapes = batch.shapes.tolist()
    if any(s[0] for s in shapes):  # pixels a worker decoded (not a JPEG)
        return None
    files = [p.numpy() for p in batch.data.split(batch.lengths.tolist())]
    boxes = batch.boxes[:, v].numpy()
    try:
        out = _decoder(batch.device, size, interpolation, len(files))(files, boxes)
    except RuntimeError as e:  # DALI's verdict on a broken file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("DALI could not decode a file of this batch (%s); decoding the batch with "
                    "torchvision instead", first[:200])
        return None
    flips = batch.flips[:, v].to(out.device)
    if bool(flips.any()):
        idx = flips.nonzero().flatten()
        out[idx] = out[idx].flip(-1)
    return out
