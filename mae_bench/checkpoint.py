"""Checkpoints: tensors and plain Python values only, written atomically.

A mae-bench checkpoint is a dict that ``torch.load(path, weights_only=True)`` reads:

    format_version, method, config (plain dict), model, optimizer, scaler (or None),
    step (optimizer steps done), micro_step (micro-batches done), epoch, rng, extra

It is written to a temporary file in the same folder, flushed to disk and renamed into place, so
a crash mid-save leaves the previous checkpoint intact and never a partial file under the final
name. The previous checkpoint is kept as ``checkpoint.prev.pt`` as a fallback.

Official MAE pretrain checkpoints (``{"model": state_dict}``, facebookresearch/mae) are recognised
and load unchanged into ``MaskedAutoencoder``.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mae_bench.errors import CheckpointError
from mae_bench.files import CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE, atomic_file

FORMAT_VERSION = 1
LATEST = CHECKPOINT_FILE
PREVIOUS = PREVIOUS_CHECKPOINT_FILE


def save_checkpoint(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` as ``run_dir/checkpoint.pt``; the old one becomes
    ``checkpoint.prev.pt``. Returns the final path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / LATEST
    with atomic_file(final, "wb", fsync=True) as fh:
        torch.save(state, fh)
        if final.exists():  # the new file is complete on disk when it is renamed into place
            os.replace(final, run_dir / PREVIOUS)
    _fsync_dir(run_dir)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint file for a run folder or a file path; None when the folder has none."""
    path = Path(path)
    if path.is_dir():
        for name in (LATEST, PREVIOUS):
            if (path / name).is_file():
                return path / name
        return None
    return path if path.is_file() else None


_FIX = "give a run folder, the checkpoint.pt that mae-bench pretrain wrote, or an official MAE .pth"


def load_checkpoint(path: str | Path, *, trust: bool = False,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file (or the latest one in a run folder).

    Args:
        path: a checkpoint file or a run folder.
        trust: allow full unpickling for checkpoints that are not plain tensors and values
            (e.g. official checkpoints that pickled an argparse Namespace). Only for files
            from a source you trust: unpickling can run arbitrary code.
        map_location: where tensors are loaded.

    Raises:
        CheckpointError: the file does not exist, is not a checkpoint, is truncated or
            corrupted, or needs unsafe unpickling without ``trust``.
    """
    given = Path(path)
    file = find_checkpoint(given)
    if file is None:
        where = "has no checkpoint.pt" if given.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {given} {where}")
    kind = _torch_save_kind(file)
    if kind is None:
        raise CheckpointError(f"{file} is not a checkpoint (not a file written by torch.save); "
                              f"{_FIX}")
    if kind == "broken-zip":
        raise CheckpointError(f"checkpoint {file} is truncated or corrupted (an incomplete "
                              "archive); resume falls back to checkpoint.prev.pt if present")
    try:
        obj = torch.load(file, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as exc:
        if not trust and "Unsupported global" in str(exc):
            raise CheckpointError(
                f"checkpoint {file} holds objects that need unsafe unpickling; pass "
                "--trust-checkpoint only if you trust its source"
            ) from None
        raise CheckpointError(
            f"checkpoint {file} is truncated, corrupted or not a checkpoint; {_FIX}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {file} is truncated, corrupted or not a checkpoint ({reason[:120]}); "
            f"{_FIX}"
        ) from None
    if not isinstance(obj, dict) or "model" not in obj:
        raise CheckpointError(f"{file} is not a checkpoint: expected a dict with a 'model' entry; "
                              f"{_FIX}")
    return obj


def _torch_save_kind(file: Path) -> str | None:
    """"zip" or "pickle" for what torch.save writes (a zip archive; a pickle stream in its
    legacy format), "broken-zip" for a zip cut short, None for anything else."""
    with open(file, "rb") as fh:
        head = fh.read(4)
    if head == b"PK\x03\x04":
        return "zip" if zipfile.is_zipfile(file) else "broken-zip"
    return "pickle" if head[:1] == b"\x80" else None


def is_official_mae(ckpt: dict[str, Any]) -> bool:
    """True for an official facebookresearch/mae pretrain checkpoint ({"model": state_dict})."""
    sd = ckpt.get("model")
    return (
        "format_version" not in ckpt
        and isinstance(sd, dict)
        and "patch_embed.proj.weight" in sd
        and "blocks.0.attn.qkv.weight" in sd
    )


# --- RNG state as plain values -------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors / plain values (weights_only-safe)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _tuple_to_lists(random.getstate()),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_s = state["numpy"]
    np.random.set_state(
        ("MT19937", np_s["keys"].numpy().astype(np.uint32), np_s["pos"], np_s["has_gauss"],
         np_s["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuple_to_lists(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_tuple_to_lists(v) for v in value]
    return value
