"""Issue 12, "no silent wrong results": every bad input, flag and file state ends in a clear one-line error (or a logged
skip, or a correct run). Each test reproduces one item: bad input -> the exact message and exit code, or the correct
result. Tiny models and a few steps only."""
import csv
import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data_prep as dp
import eval as E
import radjepa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "vit_tiny", "--width", "64", "--heads", "2", "--depth", "1", "--pred-width", "64", "--pred-depth",
        "1", "--img-size", "32", "--patch", "16", "--batch-size", "4", "--workers", "0", "--warmup", "1",
        "--min-ctx", "1", "--log-every", "1", "--kernels", "torch", "--tgt-scale", "0.2", "0.3",
        "--ctx-scale", "1", "1", "--n-targets", "1"]


@pytest.fixture(autouse=True)
def _torch_path():
    radjepa.use_kernels(False)
    yield
    radjepa.use_kernels(False)


def images(folder, n=6, size=40, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(os.path.join(folder, f"im{i}.png"))
    return Path(folder)


def refused(argv, capsys=None):
    """radjepa.main(argv) must stop with SystemExit of one line (exit code 1 when run as a script)."""
    with pytest.raises(SystemExit) as e:
        radjepa.main([str(a) for a in argv])
    msg = str(e.value.code)
    assert isinstance(e.value.code, str) and "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step tiny run: data folder and OUT with ckpt.pt."""
    root = tmp_path_factory.mktemp("trained")
    data = images(root / "data")
    radjepa.main(["--data", str(data), "--out", str(root / "run"), "--steps", "2"] + TINY)
    return data, root / "run"


# ------------------------------------------------------------------------------------------------------ radjepa.py

@pytest.mark.parametrize("flags, message", [
    (["--patch", "0"], "error: --patch 0: must be an integer >= 1"),
    (["--heads", "0"], "error: --heads 0: must be an integer >= 1"),
    (["--img-size", "0"], "error: --img-size 0: must be an integer >= 1"),
    (["--lr", "nan"], "error: --lr nan: must be a finite number >= 0"),
    (["--n-targets", "0"], "error: --n-targets 0: must be an integer >= 1"),
    (["--workers", "-1"], "error: --workers -1: must be an integer >= 0"),
    (["--ckpt-every", "0"], "error: --ckpt-every 0: must be an integer >= 1"),
    (["--log-every", "0"], "error: --log-every 0: must be an integer >= 1"),
    (["--device", "tpu"], "error: --device tpu: must be auto, cuda or cpu"),
    (["--batch-size", "0"], "error: --batch-size 0: must be an integer >= 1"),
    (["--batch-size", "-4"], "error: --batch-size -4: must be an integer >= 1"),
    (["--steps", "0"], "error: --steps 0: must be an integer >= 1"),
    (["--steps", "-3"], "error: --steps -3: must be an integer >= 1"),
    (["--crop-scale", "0", "0"], "error: --crop-scale 0.0 0.0: must be LO HI with 0 < LO <= HI <= 1"),
    (["--stop-at", "50"], "error: --stop-at 50 is beyond --steps 10, where the schedules end"),
    (["--ema", "1.5"], "error: --ema 1.5: must be a number in [0, 1]"),
    (["--tgt-scale", "0.9", "1.0"], "error: masking: no context of >= 1 patches in 100 draws on a 2x2 grid"),
    (["--min-ctx", "1000"], "error: masking: no context of >= 1000 patches in 100 draws on a 2x2 grid"),
])
def test_every_flag_is_checked_before_any_work(tmp_path, flags, message):
    msg = refused(["--data", images(tmp_path / "d", n=1), "--out", tmp_path / "o", "--steps", "10"] + TINY + flags)
    assert msg.startswith(message), msg
    assert not (tmp_path / "o").exists()                                  # refused before anything was written


def test_cli_refusal_is_one_line_with_exit_code_1(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "radjepa.py"), "--data", str(tmp_path), "--patch", "0"],
                       capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stderr) == (1, "error: --patch 0: must be an integer >= 1\n")


def test_second_run_on_the_same_out_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    data, out = images(tmp_path / "d", n=4), tmp_path / "o"
    out.mkdir()
    with open(out / ".lock", "w") as holder:                       # a live run holds the lock
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("4242\n"), holder.flush()
        msg = refused(["--data", data, "--out", out, "--steps", "1"] + TINY)
    assert msg == f"error: --out {out} is in use by another run (pid 4242); wait for it to finish or use another --out"
    assert not (out / "ckpt.pt").exists() and not (out / "log.jsonl").exists()
    # the holder died (kill -9 leaves its lock file and a half-written temp checkpoint): the next run takes over
    (out / "ckpt.pt.tmp.999999").write_bytes(b"half a checkpoint")
    radjepa.main([str(a) for a in ["--data", data, "--out", out, "--steps", "1"] + TINY])
    assert (out / "ckpt.pt").exists() and not (out / "ckpt.pt.tmp.999999").exists()
    assert (out / ".lock").read_text().strip() == str(os.getpid())


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    msg = refused(["--data", images(tmp_path / "d", n=1), "--out", tmp_path / "f"] + TINY)
    assert msg == f"error: --out {tmp_path / 'f'} is not writable: it is a file, not a folder"


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    data, out = images(tmp_path / "d", n=4), tmp_path / "o"
    radjepa.main([str(a) for a in ["--data", data, "--out", out, "--steps", "2"] + TINY])
    before, real = (out / "ckpt.pt").read_bytes(), radjepa.claim_out

    def claim_then_fill_disk(o):
        lock = real(o)                                                    # after its start-up clean-up:
        os.symlink("/dev/full", out / f"ckpt.pt.tmp.{os.getpid()}")     # every write of our temp file is ENOSPC
        return lock
    monkeypatch.setattr(radjepa, "claim_out", claim_then_fill_disk)
    msg = refused(["--data", data, "--out", out, "--steps", "4", "--resume"] + TINY)
    assert msg == f"error: cannot write {out / 'ckpt.pt'}: No space left on device; the previous checkpoint is kept"
    assert (out / "ckpt.pt").read_bytes() == before and not os.path.lexists(out / f"ckpt.pt.tmp.{os.getpid()}")


def test_unreadable_data_never_reports_success(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"x{i}.png").write_bytes(b"\x89PNG not really")
    msg = refused(["--data", bad, "--out", tmp_path / "a", "--steps", "3"] + TINY)
    assert msg == f"error: no optimisation step was taken: no batch held a readable image (3 unreadable files); " \
                  f"check --data {bad}"
    msg = refused(["--data", bad, "--out", tmp_path / "b", "--steps", "50"] + TINY)
    assert msg == "error: 10 batches in a row held no readable image (3 distinct unreadable files so far, listed " \
                  f"above); check --data {bad}"
    assert not (tmp_path / "b" / "ckpt.pt").exists()


def test_skipped_counts_distinct_files_not_draws(tmp_path):
    data = images(tmp_path / "d", n=3)
    (data / "broken.png").write_bytes(b"\x89PNG garbage")
    radjepa.main([str(a) for a in ["--data", data, "--out", tmp_path / "o", "--steps", "6"] + TINY])
    logs = [r for r in map(json.loads, open(tmp_path / "o" / "log.jsonl")) if "loss" in r]
    assert logs[-1]["skipped_files"] == 1                                  # drawn 6 times in 24 samples, 1 file


def test_symlink_loops_visit_each_real_folder_and_file_once(tmp_path):
    data = images(tmp_path / "d" / "sub", n=3)
    os.symlink(".", data / "self")                                         # loop
    os.symlink("..", data / "up")                                          # loop through the parent
    os.symlink(data / "im0.png", data / "alias.png")                       # the same file twice
    other = images(tmp_path / "other", n=2)
    os.symlink(other, tmp_path / "d" / "linked")                           # a real folder elsewhere: followed
    paths = radjepa.list_images(str(tmp_path / "d"))
    assert len(paths) == 5 and len({os.path.realpath(p) for p in paths}) == 5


@pytest.mark.parametrize("row, why", [
    ("../escape.png,p9,train", "image path is empty or leaves the folder ('../escape.png', split 'train')"),
    ("/etc/abs.png,p9,train", "image path is empty or leaves the folder ('/etc/abs.png', split 'train')"),
    ("images/im1.png,p1,train", "repeats an earlier row ('images/im1.png', split 'train')"),
    ("images/im5.png,p5", "split must be train, val or test ('images/im5.png', split None)"),
    ("images/im5.png,p5,", "split must be train, val or test ('images/im5.png', split '')"),
])
def test_labels_csv_rows_that_would_mislead_the_trainer(tmp_path, row, why):
    images(tmp_path / "images", n=6)
    rows = ["image,patient,split"] + [f"images/im{i}.png,p{i},train" for i in range(3)] + [row]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(SystemExit) as e:
        radjepa.list_images(str(tmp_path))
    assert str(e.value) == f"error: {tmp_path / 'labels.csv'} line 5: {why}"


def test_labels_csv_that_is_not_utf8_names_the_line(tmp_path):
    (tmp_path / "labels.csv").write_bytes(b"image,patient,split\nimages/a.png,p1,train\nimages/\xe9.png,p2,train\n")
    with pytest.raises(SystemExit) as e:
        radjepa.list_images(str(tmp_path))
    assert str(e.value) == f"error: {tmp_path / 'labels.csv'} line 3: not UTF-8 text"


def test_resume_refuses_another_architecture_before_loading(trained, tmp_path):
    data, run = trained
    msg = refused(["--data", data, "--out", run, "--resume", "--steps", "4", "--width", "128", "--patch", "8"])
    assert msg == "error: --resume with a different architecture: --patch 8 (checkpoint: 16), --width 128 " \
                  "(checkpoint: 64); drop these flags or use another --out"


def test_resume_of_a_finished_run_is_not_a_success(trained):
    data, run = trained
    msg = refused(["--data", data, "--out", run, "--resume"])
    assert msg == f"error: {run / 'ckpt.pt'} is at step 2 and this run ends at step 2: nothing to train (raise " \
                  f"--steps to continue it)"


def bad_checkpoint(trained, tmp_path, edit):
    data, run = trained
    out = tmp_path / "run"
    out.mkdir(parents=True)
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    edit(ck)
    torch.save(ck, out / "ckpt.pt")
    return data, out


def test_corrupt_or_nan_checkpoint_on_resume_is_one_line(trained, tmp_path):
    data, out = bad_checkpoint(trained, tmp_path, lambda ck: ck["encoder"]["norm.weight"].fill_(float("nan")))
    msg = refused(["--data", data, "--out", out, "--resume", "--steps", "4"])
    assert msg == f"error: --resume: {out / 'ckpt.pt'} is not a good checkpoint: encoder has NaN/Inf weights " \
                  f"(norm.weight)"
    (out / "ckpt.pt").write_bytes(b"PK\x03\x04 truncated")
    assert refused(["--data", data, "--out", out, "--resume"]).startswith(
        f"error: {out / 'ckpt.pt'} is not a RadJEPA checkpoint: cannot be loaded")


def test_checkpoint_config_problems_in_load_encoder(trained, tmp_path, capsys):
    def newer(ck):
        ck["config"]["rope_theta"] = 100.0                                # a key this version does not know
    _, out = bad_checkpoint(trained, tmp_path / "a", newer)
    enc = radjepa.load_encoder(str(out / "ckpt.pt"))
    assert "warning: ignoring unknown config key(s) rope_theta" in capsys.readouterr().err
    assert enc.embed_dim == 64
    _, out = bad_checkpoint(trained, tmp_path / "b", lambda ck: ck["config"].update(model="vit_huge"))
    with pytest.raises(ValueError, match="--model 'vit_huge' is not one of"):  # a library raises, never exits
        radjepa.load_encoder(str(out / "ckpt.pt"))
    _, out = bad_checkpoint(trained, tmp_path / "c", lambda ck: ck["config"].update(width=128))
    with pytest.raises(ValueError, match=r"its target_encoder does not fit the architecture of its config: size "
                                         r"mismatch for .*torch.Size\(\[128"):
        radjepa.load_encoder(str(out / "ckpt.pt"))
    _, out = bad_checkpoint(trained, tmp_path / "d", lambda ck: ck["target_encoder"]["norm.bias"].fill_(float("inf")))
    with pytest.raises(ValueError, match=r"is not a good checkpoint: target_encoder has NaN/Inf weights \(norm.bias\)"):
        radjepa.load_encoder(str(out / "ckpt.pt"))


def test_ctrl_c_between_optimizer_step_and_step_counter_resumes_exactly(tmp_path, monkeypatch):
    """SIGINT arrives after opt.step() and before the EMA and step += 1 of step 2: the checkpoint written on Ctrl-C
    must hold one consistent step, so interrupted + resumed == uninterrupted, bit for bit."""
    data = images(tmp_path / "d", n=8)
    common = [str(a) for a in ["--data", data, "--steps", "5"] + TINY]
    radjepa.main(common + ["--out", str(tmp_path / "straight")])
    real, calls = radjepa.ema_update, []

    def ema_with_ctrl_c(target, online, m):
        calls.append(m)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)                            # Ctrl-C right after opt.step()
        real(target, online, m)
    monkeypatch.setattr(radjepa, "ema_update", ema_with_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        radjepa.main(common + ["--out", str(tmp_path / "split")])
    monkeypatch.setattr(radjepa, "ema_update", real)
    ck = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 3                                                 # the interrupted step completed
    radjepa.main(common + ["--out", str(tmp_path / "split"), "--resume"])
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    for k in ("encoder", "predictor", "target_encoder"):
        for n, t in a[k].items():
            assert torch.equal(t, b[k][n]), f"{k}.{n} differs after Ctrl-C + resume"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
