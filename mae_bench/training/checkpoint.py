"""Checkpoints: tensors and plain Python values only, written atomically.

A mae-bench checkpoint is a dict that ``torch.load(path, weights_only=True)`` reads:

    format_version, method, config (plain dict), model, optimizer, scaler (or None),
    step (optimizer steps done), micro_step (micro-batches done), epoch, rng, extra

It is written to a temporary file in the same folder, flushed to disk and renamed into place, so
a crash mid-save leaves the previous checkpoint intact and never a partial file under the final
name. The previous checkpoint is kept as ``checkpoint.prev.pt`` as a fallback. A save that fails
(a full disk) raises ``CheckpointSaveError``, one line, with the previous files as they were.

Loading checks the CRC-32 that torch's zip writer stores for every member (the pickle, each
tensor's storage, the RNG state): one flipped bit anywhere in the data is a damaged checkpoint,
never weights that load and silently give other numbers. This covers checkpoints written before
the check existed and official ``.pth`` files alike, since every torch zip file carries them.

Official MAE pretrain checkpoints (``{"model": state_dict}``, facebookresearch/mae) are recognised
and load unchanged into ``MaskedAutoencoder``.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mae_bench.errors import CheckpointError, TrainingError
from mae_bench.files import CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE, atomic_file

FORMAT_VERSION = 1
LATEST = CHECKPOINT_FILE
PREVIOUS = PREVIOUS_CHECKPOINT_FILE


class CheckpointSaveError(TrainingError):
    """A checkpoint could not be written (a full disk, an I/O error). The run stops; the files
    of earlier saves are left exactly as they were and the partial temporary file is removed.
    The CLI prints it as one ``error:`` line and exits with code 1."""

    label = "error: "


def save_checkpoint(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` as ``run_dir/checkpoint.pt``; the old one becomes
    ``checkpoint.prev.pt``. Returns the final path.

    Raises:
        CheckpointSaveError: the file could not be written (e.g. no space left on the device).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / LATEST
    try:
        with atomic_file(final, "wb", fsync=True) as fh:
            torch.save(state, fh)
            fh.flush()  # a full disk fails here or in torch.save, before any rename
            os.fsync(fh.fileno())
            if final.exists():  # the new file is complete on disk when it is renamed into place
                os.replace(final, run_dir / PREVIOUS)
    except (OSError, RuntimeError) as exc:
        failure = _write_failure(exc)
        if failure is None:
            raise
        reason, code = failure
        step = state.get("step")
        at = f" at step {step}" if step is not None else ""
        kept = ("the last saved checkpoint is kept"
                if final.exists() or (run_dir / PREVIOUS).exists() else "no checkpoint was saved")
        fix = "; free some space" if code in (errno.ENOSPC, errno.EDQUOT) else ""
        raise CheckpointSaveError(f"could not save the checkpoint{at} in {run_dir} ({reason}); "
                                  f"{kept}{fix}", step) from None
    _fsync_dir(run_dir)
    return final


def _write_failure(exc: BaseException) -> tuple[str, int | None] | None:
    """Why writing failed, in a few words ("No space left on device"), with the errno where
    known, or None when ``exc`` is not a write failure. torch's zip writer reports a failed
    write of the file object as a RuntimeError ("[enforce fail at inline_container.cc] ...
    unexpected pos") raised while handling the OSError; the OSError says what went wrong."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen.strerror or str(seen) or type(seen).__name__, seen.errno
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("inline_container" in text or "write" in text):
        return text.splitlines()[0][:120], None
    return None


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


def state_mismatch(own: dict[str, Any], given: dict[str, Any],
                   needed: Any = None) -> str | None:
    """Why ``given`` tensors do not load into a module whose state dict is ``own``: the missing
    (of ``needed``, default every key of ``own``), unexpected and mis-shaped keys, counted and
    the first few named, in one phrase; None when they fit."""
    missing = [k for k in (own if needed is None else needed) if k not in given]
    unexpected = [k for k in given if k not in own]
    shapes = [f"{k} {list(given[k].shape)} vs {list(own[k].shape)}" for k in own
              if k in given and given[k].shape != own[k].shape]
    problems = [f"{what} {len(keys)} key{'s' if len(keys) > 1 else ''} "
                f"({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for what, keys in (("missing", missing), ("unexpected", unexpected),
                                   ("shape mismatch in", shapes)) if keys]
    return "; ".join(problems) or None


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
    if file.name == PREVIOUS and given.is_dir():
        warnings.warn(f"{given / LATEST} is missing; using {file}, the checkpoint saved before "
                      "it (an earlier step)", stacklevel=1)  # here: the CLI shows one line
    kind = _torch_save_kind(file)
    if kind is None:
        raise CheckpointError(f"{file} is not a checkpoint (not a file written by torch.save); "
                              f"{_FIX}")
    if kind == "broken-zip":
        raise CheckpointError(f"checkpoint {file} is truncated or corrupted (an incomplete "
                              "archive); resume falls back to checkpoint.prev.pt if present")
    if kind == "zip":
        _check_crcs(file)
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


def _check_crcs(file: Path) -> None:
    """Read every member of a torch zip file, checking the CRC-32 stored for it.

    Raises:
        CheckpointError: a member's bytes do not match its CRC (a flipped bit, a torn write) or
            the archive's directory is damaged.
    """
    damaged = "resume falls back to checkpoint.prev.pt if present"
    try:
        with zipfile.ZipFile(file) as archive:
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size:
                    continue  # written with torch's CRC computation switched off: no checksum
                with archive.open(info) as member:  # raises BadZipFile on a CRC mismatch
                    while member.read(1 << 24):
                        pass
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"checkpoint {file} is damaged ({str(exc)[:120]}): its bytes are not "
                              f"the ones that were saved; {damaged}") from None
    except (OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {file} is truncated or corrupted "
                              f"({str(exc)[:120] or type(exc).__name__}); {damaged}") from None


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
