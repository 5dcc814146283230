"""Faults around checkpoints and run folders (mae_bench/training/checkpoint.py, the start-up
checks and saves of mae_bench/methods/engine.py): a flipped bit, a missing latest checkpoint, a
full disk mid-save, a save killed mid-write, and an --out folder that is not a run."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli
from rich.console import Console

from evals.encoders import load_source
from mae_bench.config import RunConfig
from mae_bench.errors import CheckpointError, ConfigError
from mae_bench.methods.engine import pretrain
from mae_bench.training import checkpoint as ck

pytestmark = pytest.mark.usefixtures("one_thread")
# digits at its native 8 px, 22 steps of 64 per epoch; a few steps take well under a second
TINY = RunConfig().replace(model={"arch": "vit_micro_patch2", "img_size": 8},
                           train={"epochs": 1, "batch_size": 64, "log_every": 1})
CLI_TINY = ["--arch", "vit_micro_patch2", "--img-size", "8", "--batch-size", "64", "--epochs", "1",
            "--log-every", "1", "--no-progress"]


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _flip_one_bit_in_a_tensor(path: Path) -> str:
    """Flip one bit in the middle of the largest tensor storage inside a torch zip file, in
    place; returns the member's name. The data offset is read from the member's local header
    (30 fixed bytes, then the name and the extra field)."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename),
                   key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    head = info.header_offset
    name_len = int.from_bytes(data[head + 26:head + 28], "little")
    extra_len = int.from_bytes(data[head + 28:head + 30], "little")
    start = head + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x04
    path.write_bytes(bytes(data))
    return info.filename


def _two_checkpoints(run: Path) -> None:
    """A run folder with checkpoint.prev.pt at step 2 and checkpoint.pt at step 4."""
    pretrain(TINY, run, max_steps=2, progress=False)
    pretrain(TINY, run, max_steps=4, progress=False)
    assert ck.load_checkpoint(run / ck.PREVIOUS)["step"] == 2


# --- 5: a damaged checkpoint is never read as good --------------------------------------------


def test_one_flipped_bit_in_a_weight_tensor_is_a_damaged_checkpoint(tmp_path):
    state = {"format_version": 1, "model": {"w": torch.randn(64, 32)}, "step": 3}
    ck.save_checkpoint(tmp_path, state)
    member = _flip_one_bit_in_a_tensor(tmp_path / ck.LATEST)
    # torch itself loads the flipped file without a word, with other weights
    flipped = torch.load(tmp_path / ck.LATEST, weights_only=True)["model"]["w"]
    assert not torch.equal(flipped, state["model"]["w"])
    with pytest.raises(CheckpointError) as exc:
        ck.load_checkpoint(tmp_path)
    assert str(exc.value) == (
        f"checkpoint {tmp_path / ck.LATEST} is damaged (Bad CRC-32 for file '{member}'): its "
        "bytes are not the ones that were saved; resume falls back to checkpoint.prev.pt if "
        "present")


def test_undamaged_official_and_legacy_checkpoints_still_load(tmp_path):
    """Official MAE .pth files (a zip written by torch.save, with args pickled) and files in
    torch's legacy pickle format (no CRCs to check) load as before; a flipped bit in an official
    file is caught too."""
    weights = {"model": {"patch_embed.proj.weight": torch.randn(8, 3, 2, 2)}}
    official, legacy = tmp_path / "mae_pretrain.pth", tmp_path / "legacy.pt"
    torch.save(weights, official)
    torch.save(weights, legacy, _use_new_zipfile_serialization=False)
    for path in (official, legacy):
        got = ck.load_checkpoint(path)["model"]["patch_embed.proj.weight"]
        assert torch.equal(got, weights["model"]["patch_embed.proj.weight"])
    _flip_one_bit_in_a_tensor(official)
    with pytest.raises(CheckpointError, match="mae_pretrain.pth is damaged"):
        ck.load_checkpoint(official)


def test_resume_falls_back_to_previous_when_a_bit_flipped(tmp_path, capsys):
    run = tmp_path / "run"
    _two_checkpoints(run)
    damaged = (run / ck.LATEST).read_bytes()
    _flip_one_bit_in_a_tensor(run / ck.LATEST)
    flipped = (run / ck.LATEST).read_bytes()
    assert flipped != damaged
    result = pretrain(TINY, run, max_steps=6, progress=False,
                      console=Console(stderr=True, width=400))
    err = capsys.readouterr().err
    assert "is damaged (Bad CRC-32 for file" in err
    assert "resumed from checkpoint.prev.pt" in err
    kept = list(run.glob("checkpoint.damaged-*.pt"))
    assert len(kept) == 1 and kept[0].read_bytes() == flipped
    assert result.step == 6 and ck.load_checkpoint(run)["step"] == 6
    steps = [int(line.split('"step": ')[1].split(",")[0])
             for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # replayed from step 2, nothing logged twice


# --- 6: no silent fallback, no overwritten folder ---------------------------------------------


def test_missing_latest_checkpoint_is_said_when_previous_is_used(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _two_checkpoints(run)
    (run / ck.LATEST).unlink()
    message = f"{run / ck.LATEST} is missing; using {run / ck.PREVIOUS}, the checkpoint saved "
    with pytest.warns(UserWarning) as record:  # eval's path: the encoder of the run
        source = load_source(run)
    assert [str(w.message) for w in record] == [message + "before it (an earlier step)"]
    assert source.pretrain["pretrain_epochs"] == round(2 / 22, 3)  # step 2 of 22
    # the CLI: one warning line, and the resume starts at step 2
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", *CLI_TINY, "--out", str(run),
                           "--max-steps", "5")
    assert code == 0, err
    assert [ln for ln in _lines(err) if ln.startswith("warning:")] == [
        f"warning: {message}before it (an earlier step)"]
    assert ck.load_checkpoint(run)["step"] == 5


@pytest.mark.parametrize("files", [
    {"config.yaml": "lr: 0.1\n", "summary.json": '{"acc": 0.9}', "metrics.jsonl":
     '{"step": 0, "loss": 2.0}\n{"step": 1, "loss": 1.5}\n'},
    {"notes.txt": "my notes\n"},
], ids=["own-run-files", "any-file"])
def test_pretrain_refuses_a_folder_that_is_not_a_run(tmp_path, monkeypatch, capsys, files):
    out = tmp_path / "mine"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    code, stdout, err = run_cli(monkeypatch, capsys, "pretrain", *CLI_TINY, "--out", str(out),
                                "--max-steps", "1")
    assert code == 2 and stdout == ""
    names = ", ".join(sorted(files))
    assert _lines(err) == [
        f"error: {out} is not empty and is not a mae-bench run folder (it holds {names}, but no "
        "run.json or checkpoint); pretraining there would overwrite files: give a new or empty "
        "folder"]
    assert {p.name: p.read_text() for p in out.iterdir()} == files  # nothing written


def test_symlinked_out_is_said_or_refused(tmp_path, monkeypatch, capsys):
    user = tmp_path / "user"
    user.mkdir()
    (user / "config.yaml").write_text("mine: true\n")
    (tmp_path / "to-user").symlink_to(user)
    with pytest.raises(ConfigError, match="is not a mae-bench run folder"):
        pretrain(TINY, tmp_path / "to-user", max_steps=1, progress=False)
    assert [p.name for p in user.iterdir()] == ["config.yaml"]
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError) as exc:
        pretrain(TINY, tmp_path / "dangling", max_steps=1, progress=False)
    assert str(exc.value) == (f"{tmp_path / 'dangling'} is a symbolic link to "
                              f"{tmp_path / 'nowhere'}, which is not a folder; give a folder "
                              "for the run")
    assert not (tmp_path / "nowhere").exists()
    # a link to a run folder (a scratch disk) resumes it, and says where the run is
    real = tmp_path / "scratch" / "run"
    pretrain(TINY, real, max_steps=2, progress=False)
    (tmp_path / "run").symlink_to(real)
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", *CLI_TINY, "--out",
                           str(tmp_path / "run"), "--max-steps", "3")
    assert code == 0
    assert f"note: {tmp_path / 'run'} is a symbolic link: the run is in {real}" in \
        " ".join(err.split())
    assert ck.load_checkpoint(real)["step"] == 3


def test_run_killed_before_its_first_checkpoint_still_starts(tmp_path):
    """What pretrain writes before its first checkpoint (the pid file, config.yaml, run.json,
    metrics) marks the folder as a run: starting it again is not refused."""
    run = tmp_path / "run"
    pretrain(TINY, run, max_steps=1, progress=False)
    for name in (ck.LATEST, "summary.json"):
        (run / name).unlink()
    (run / ".lock").write_text("999999\n")  # a SIGKILL leaves the dead trainer's pid file
    result = pretrain(TINY, run, max_steps=2, progress=False)
    assert result.step == 2 and ck.load_checkpoint(run)["step"] == 2


# --- 7: a full disk mid-save ------------------------------------------------------------------


class _FullDisk:
    """A file object that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, fh, room: int):
        self.fh, self.room = fh, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def _fill_disk_during_saves(monkeypatch, room: int = 4096) -> None:
    """torch.save writes into a file that fills up after ``room`` bytes: torch reports it as
    a RuntimeError ("enforce fail at inline_container.cc ... unexpected pos") raised while
    handling the OSError, as on a real full tmpfs."""
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, fh: real_save(obj, _FullDisk(fh, room)))


def test_full_disk_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, {"format_version": 1, "model": {"w": torch.ones(4096)},
                                  "step": 1})
    before = (tmp_path / ck.LATEST).read_bytes()
    _fill_disk_during_saves(monkeypatch)
    with pytest.raises(ck.CheckpointSaveError) as exc:
        ck.save_checkpoint(tmp_path, {"format_version": 1, "model": {"w": torch.zeros(4096)},
                                      "step": 2})
    assert str(exc.value) == (f"could not save the checkpoint at step 2 in {tmp_path} (No space "
                              "left on device); the last saved checkpoint is kept; free some space")
    assert exc.value.step == 2
    assert [p.name for p in tmp_path.iterdir()] == [ck.LATEST]  # no temp file, no prev
    assert (tmp_path / ck.LATEST).read_bytes() == before


def test_cli_full_disk_during_save_is_one_error_line_and_exit_1(tmp_path, monkeypatch, capsys):
    run, results = tmp_path / "run", tmp_path / "results"
    args = ["pretrain", *CLI_TINY, "--out", str(run), "--results-dir", str(results)]
    code, _, _ = run_cli(monkeypatch, capsys, *args, "--max-steps", "2")
    assert code == 0
    good = (run / ck.LATEST).read_bytes()
    _fill_disk_during_saves(monkeypatch)
    code, stdout, err = run_cli(monkeypatch, capsys, *args, "--max-steps", "4")
    assert code == 1 and stdout == ""
    assert _lines(" ".join(err.split())) == [
        f"error: could not save the checkpoint at step 4 in {run} (No space left on device); "
        f"the last saved checkpoint is kept; free some space, then resume with: mae-bench "
        f"pretrain --resume {run}"]
    assert (run / ck.LATEST).read_bytes() == good
    assert not list(run.glob(".*.tmp")) and not (run / ck.PREVIOUS).exists()
    assert not results.exists()  # a full disk is not a failed pretraining row


# --- 8: temp files of killed saves ------------------------------------------------------------

_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import torch
    from mae_bench.training import checkpoint

    def killed_mid_write(obj, fh):
        fh.write(b"PK\\x03\\x04" + bytes(100_000))  # part of a checkpoint, then SIGKILL
        fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = killed_mid_write
    checkpoint.save_checkpoint(sys.argv[1], {"model": {}, "step": 3})
""")


@pytest.mark.multiprocess
def test_resume_removes_temp_files_of_killed_saves(tmp_path):
    run = tmp_path / "run"
    pretrain(TINY, run, max_steps=2, progress=False)
    killed = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(run)], capture_output=True)
    assert killed.returncode == -9
    left = list(run.glob(".checkpoint.pt-*.tmp"))
    assert len(left) == 1 and left[0].stat().st_size == 100_004  # what a killed save leaves
    (run / ".run.json-x1y2z3.tmp").write_text("{")  # killed while writing run.json
    (run / ".checkpoint.pt-abc123.tmp").write_bytes(b"")
    (run / ".my-notes.tmp").write_text("not the trainer's")
    pretrain(TINY, run, max_steps=3, progress=False)
    assert sorted(p.name for p in run.glob(".*.tmp")) == [".my-notes.tmp"]
    assert ck.load_checkpoint(run)["step"] == 3
