"""Batches of crops that the training device finishes: resized there (and, for JPEG bytes, decoded
there too), so that the DataLoader workers only decode and cut.

The workers of a streamed data set (``mae_bench.data.pipeline``) hand over one of two batch kinds
per view:

- ``CropBatch``: decoded crops of different sizes, packed into one flat uint8 buffer (one copy to
  the device, one pinned buffer), with the flips still to apply;
- ``EncodedBatch`` views: the image files' bytes and each view's crop box in full-resolution
  pixels; the device decodes each image once for all its views (nvJPEG on CUDA through
  ``torchvision.io.decode_jpeg``, batched), then crops.

``resize`` turns either into uint8 [B, C, S, S] with torchvision's resize kernel (antialiased
bicubic or bilinear: the same kernel, so the same pixels, as the all-in-workers path for the same
crop), flipped where drawn. ``augment.BatchViews.finish`` calls it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mae_bench.errors import DataError

log = logging.getLogger("mae_bench.data")  # one logger name for the whole package


def _resize(crop: Tensor, size: int, interpolation: str) -> Tensor:
    """uint8 [C, h, w] -> uint8 [C, size, size] with torchvision's kernel (native uint8 on CPU)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    mode = InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR
    return TF.resize(crop, [size, size], interpolation=mode, antialias=True)


def _empty(n: int) -> Tensor:
    """uint8 [n], in shared memory when called in a DataLoader worker."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(n, dtype=torch.uint8)
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(n), 0, (n,),
                                                  (1,))


def resize_crop(crop: Tensor, size: int, interpolation: str, flip: bool) -> Tensor:
    """One crop uint8 [C, h, w] -> uint8 [C, size, size], flipped when ``flip``."""
    out = _resize(crop, size, interpolation)
    return out.flip(-1) if flip else out


def _flip_where(images: Tensor, flips: Tensor) -> Tensor:
    """Flips the images [B, C, S, S] whose ``flips`` [B] is True, in place."""
    if bool(flips.any()):
        idx = flips.nonzero().flatten().to(images.device)
        images[idx] = images[idx].flip(-1)
    return images


def decode_jpeg(data: Tensor | list[Tensor], device: torch.device | str = "cpu"):
    """``torchvision.io.decode_jpeg`` to RGB (libjpeg-turbo on the CPU, nvJPEG on CUDA; a list
    is decoded batched), without the deprecation warning torchvision 0.29 prints on every call
    (it points to TorchCodec, which is not a dependency here).

    Args:
        data: uint8 [L] file bytes, on the CPU, or a list of them.

    Raises:
        RuntimeError: a file libjpeg cannot decode.
    """
    import warnings

    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as tv_decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return tv_decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _decode_one(data: Tensor, device: torch.device | str) -> Tensor | None:
    """One JPEG on ``device``; None (warned) when it cannot be decoded."""
    try:
        return decode_jpeg(data, device=device)
    except RuntimeError as e:
        log.warning("skipping an image that could not be decoded on the device (%s); a readable "
                    "image of the same batch takes its place", e)
        return None


@dataclass
class CropBatch:
    """Crops of different sizes, one per image, packed for a single transfer.

    Attributes:
        pixels: uint8 [sum of h * w * C], every crop's pixels one after the other, channels
            last: the decoders' own order (a crop of their CHW view copies whole rows), and the
            layout torch's uint8 resize is fastest on.
        shapes: int64 [B, 3] (C, h, w) per crop; stays on the CPU (sizes are needed in Python).
        flips: bool [B], flip horizontally after the resize.
    """

    pixels: Tensor
    shapes: Tensor
    flips: Tensor

    @classmethod
    def pack(cls, crops: list[Tensor], flips: list[bool]) -> CropBatch:
        """One batch from per-image uint8 crops [C, h_i, w_i] and their flips, copied once into
        one buffer (in shared memory inside a DataLoader worker, as the default collate does,
        so that handing the batch over copies nothing more)."""
        shapes = torch.tensor([list(c.shape) for c in crops], dtype=torch.int64)  # [B, 3]
        pixels = _empty(int(shapes.prod(dim=1).sum()) if crops else 0)
        start = 0
        for c in crops:  # [C, h, w] -> HWC
            pixels[start:start + c.numel()].view(*c.shape[1:], c.shape[0]).copy_(c.permute(1, 2, 0))
            start += c.numel()
        return cls(pixels, shapes, torch.tensor(flips, dtype=torch.bool))

    def __len__(self) -> int:
        return self.shapes.shape[0]

    def pin_memory(self) -> CropBatch:
        """Called by the DataLoader's pin-memory thread (training on CUDA)."""
        return CropBatch(self.pixels.pin_memory(), self.shapes, self.flips)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CropBatch:
        return CropBatch(self.pixels.to(device, non_blocking=non_blocking), self.shapes,
                         self.flips)

    def crops(self) -> list[Tensor]:
        """The crops as uint8 [C, h_i, w_i] (channels-last) views into ``pixels``."""
        sizes = self.shapes.prod(dim=1).tolist()
        return [p.view(h, w, c).permute(2, 0, 1)
                for p, (c, h, w) in zip(self.pixels.split(sizes), self.shapes.tolist(),
                                        strict=True)]

    def resize(self, size: int, interpolation: str = "bicubic") -> Tensor:
        """uint8 [B, C, size, size]: every crop resized, then flipped where drawn."""
        out = torch.stack([_resize(c, size, interpolation) for c in self.crops()])
        return _flip_where(out, self.flips)


@dataclass(eq=False)
class EncodedBatch:
    """The image files of a batch, still encoded, and every view's crop box.

    Attributes:
        data: uint8 [sum of lengths], the files' bytes (JPEG) or, for other formats, their
            pixels decoded in the worker (CHW), one after the other.
        lengths: int64 [B] bytes per image in ``data``.
        shapes: int64 [B, 3]: (C, H, W) of pixels decoded in the worker; (0, H, W) for JPEG bytes.
        boxes: int64 [B, V, 4] (top, left, height, width) per view, in full-resolution pixels.
        flips: bool [B, V].
        device: where ``decoded`` decodes (set by ``to``).
        decoder: "torchvision" (``decoded``, then crop and resize) or "dali" (each view's box
            decoded and resized by DALI: ``mae_bench.data.dali``; torchvision where DALI
            refuses the batch).
    """

    data: Tensor
    lengths: Tensor
    shapes: Tensor
    boxes: Tensor
    flips: Tensor
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    decoder: str = "torchvision"
    _decoded: list[Tensor] | None = None
    _broken: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return self.lengths.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EncodedBatch:
        """Records where to decode: ``torchvision.io.decode_jpeg`` takes the bytes on the CPU
        and decodes on ``device`` (batched nvJPEG on CUDA)."""
        self.device = torch.device(device)
        return self

    def pin_memory(self) -> EncodedBatch:
        return self

    def decoded(self) -> list[Tensor]:
        """uint8 [C, H, W] per image on ``device``, decoded once for all views."""
        if self._decoded is None:
            parts = self.data.split(self.lengths.tolist())
            jpeg = [i for i, s in enumerate(self.shapes.tolist()) if s[0] == 0]
            images: list[Tensor | None] = [None] * len(self)
            device = self.device if self.device.type == "cuda" else "cpu"
            try:
                decoded = decode_jpeg([parts[i] for i in jpeg], device) if jpeg else []
            except RuntimeError:  # a file whose header read well but whose data is broken
                decoded = [_decode_one(parts[i], device) for i in jpeg]
            for i, image in zip(jpeg, decoded, strict=True):
                images[i] = None if image is None else image.to(self.device)
            for i, s in enumerate(self.shapes.tolist()):
                if s[0]:
                    images[i] = parts[i].view(*s).to(self.device)
            good = next((im for im in images if im is not None), None)
            if good is None:
                raise DataError("no image of a batch could be decoded on the device; check the "
                                "warnings above")
            # a broken file is replaced by a readable image of the same batch (batches keep
            # their size, as the workers' rule does); its boxes were drawn for its own size
            self._decoded = [good if im is None else im for im in images]
            self._broken = [i for i, im in enumerate(images) if im is None]
        return self._decoded  # type: ignore[return-value]

    def box(self, i: int, v: int) -> tuple[int, int, int, int]:
        """View ``v``'s box of image ``i``, clipped to the decoded image (a replaced broken
        image has another size)."""
        top, left, h, w = self.boxes[i, v].tolist()
        if i in self._broken:
            _, height, width = self.decoded()[i].shape
            top, left, h, w = 0, 0, height, width
        return top, left, h, w

    def view(self, v: int) -> EncodedView:
        return EncodedView(self, v)


@dataclass(eq=False)
class EncodedView:
    """View ``v`` of an ``EncodedBatch``: what ``BatchViews(spec_v).finish`` receives."""

    batch: EncodedBatch
    v: int

    def __len__(self) -> int:
        return len(self.batch)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EncodedView:
        self.batch.to(device, non_blocking)
        return self

    def pin_memory(self) -> EncodedView:
        return self

    def resize(self, size: int, interpolation: str = "bicubic") -> Tensor:
        """uint8 [B, C, size, size]: view ``v``'s box of every decoded image, resized and
        flipped."""
        if self.batch.decoder == "dali":
            from mae_bench.data import dali

            done = dali.decode_resize(self.batch, self.v, size, interpolation)
            if done is not None:
                return done
        crops = []
        for i, image in enumerate(self.batch.decoded()):
            top, left, h, w = self.batch.box(i, self.v)
            crops.append(_resize(image[:, top:top + h, left:left + w], size, interpolation))
        return _flip_where(torch.stack(crops), self.batch.flips[:, self.v])


DeviceCrops = CropBatch | EncodedView  # what a view's finish resizes on the device
