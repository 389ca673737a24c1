"""Issue 12, "no silent wrong results": every bad input, flag and file state ends in a clear one-line error (or a logged
skip, or a correct run). Each test reproduces one item: bad input -> the exact message and exit code, or the correct
result. Tiny models and a few steps only."""
import csv
import fcntl
import json
import os
import random
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
        "--ctx-scale", "1", "1", "--n-targets", "1", "--precision", "fp32"]  # exact 1-vs-2-process equivalences

pytestmark = pytest.mark.usefixtures("one_thread", "torch_path")   # conftest.py


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
    assert msg == f"error: --out {out} is in use by another process (pid 4242); wait for it or stop it"
    assert not (out / "ckpt.pt").exists() and not (out / "log.jsonl").exists()
    # the holder died (kill -9 leaves its lock file and a half-written temp checkpoint): the next run takes over
    (out / ".ckpt.pt.tmp999999").write_bytes(b"half a checkpoint")
    radjepa.main([str(a) for a in ["--data", data, "--out", out, "--steps", "1"] + TINY])
    assert (out / "ckpt.pt").exists() and not (out / ".ckpt.pt.tmp999999").exists()
    assert (out / ".lock").read_text().strip() == str(os.getpid())


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    msg = refused(["--data", images(tmp_path / "d", n=1), "--out", tmp_path / "f"] + TINY)
    assert msg == f"error: --out {tmp_path / 'f'} is not a writable folder (file exists)"


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    data, out = images(tmp_path / "d", n=4), tmp_path / "o"
    radjepa.main([str(a) for a in ["--data", data, "--out", out, "--steps", "2"] + TINY])
    before, real = (out / "ckpt.pt").read_bytes(), radjepa.plumbing.claim_out
    tmp = out / f".ckpt.pt.tmp{os.getpid()}"

    def claim_then_fill_disk(o):
        lock = real(o)                                                    # after its start-up clean-up:
        os.symlink("/dev/full", tmp)                                      # every write of our temp file is ENOSPC
        return lock
    monkeypatch.setattr(radjepa.plumbing, "claim_out", claim_then_fill_disk)
    msg = refused(["--data", data, "--out", out, "--steps", "4", "--resume"] + TINY)
    assert msg == f"error: cannot write {out / 'ckpt.pt'}: no space left on device; the previous checkpoint is kept"
    assert (out / "ckpt.pt").read_bytes() == before and not os.path.lexists(tmp)


def test_unreadable_data_never_reports_success(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"x{i}.png").write_bytes(b"\x89PNG not really")
    msg = refused(["--data", bad, "--out", tmp_path / "a", "--steps", "3"] + TINY)  # every batch of a short run
    assert msg == f"error: 3 batches in a row held no readable image (3 distinct unreadable files, listed above); " \
                  f"check --data {bad}"
    msg = refused(["--data", bad, "--out", tmp_path / "b", "--steps", "50"] + TINY)  # 10 in a row of a long one
    assert msg == "error: 10 batches in a row held no readable image (3 distinct unreadable files, listed above); " \
                  f"check --data {bad}"
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
    ("../escape.png,p9,train", "image path '../escape.png' is empty or leaves the prepared folder"),
    ("/etc/abs.png,p9,train", "image path '/etc/abs.png' is empty or leaves the prepared folder"),
    ("./images/im1.png,p1,train", "image './images/im1.png' repeats line 3 (it would count twice)"),
    ("images/im5.png,p5", "the row has 2 cells, the header has 3: ['images/im5.png', 'p5']"),
    ("images/im5.png,p5,", "split must be one of train, val, test, got '' for 'images/im5.png'"),
])
def test_labels_csv_rows_that_would_mislead_the_trainer(tmp_path, row, why):
    """The trainer, eval.py and data_prep.py read labels.csv through one reader (plumbing.read_labels): the
    same refusal, in the trainer's one-line form, before any work."""
    images(tmp_path / "images", n=6)
    rows = ["image,patient,split"] + [f"images/im{i}.png,p{i},train" for i in range(3)] + [row]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    msg = refused(["--data", tmp_path, "--out", tmp_path / "o"] + TINY)
    assert msg == f"error: {tmp_path / 'labels.csv'} line 5: {why}"
    assert not (tmp_path / "o").exists()


def test_labels_csv_that_is_not_utf8_names_the_line(tmp_path):
    (tmp_path / "labels.csv").write_bytes(b"image,patient,split\nimages/a.png,p1,train\nimages/\xe9.png,p2,train\n")
    with pytest.raises(ValueError) as e:
        radjepa.list_images(str(tmp_path))
    assert str(e.value) == f"{tmp_path / 'labels.csv'} line 3: not UTF-8 text (byte 0xe9)"


def test_resume_refuses_another_architecture_before_loading(trained, tmp_path):
    data, run = trained
    msg = refused(["--data", data, "--out", run, "--resume", "--steps", "4", "--width", "128", "--patch", "8"])
    assert msg == "error: --resume with a different architecture: --patch 8 (checkpoint: 16), --width 128 " \
                  "(checkpoint: 64); drop these flags or use another --out"


def test_resume_past_the_end_is_refused_and_a_finished_run_is_left_alone(trained, capsys):
    data, run = trained
    msg = refused(["--data", data, "--out", run, "--resume", "--steps", "1"])
    assert msg == f"error: {run / 'ckpt.pt'} is at step 2, this run ends at step 1: nothing to train (raise " \
                  f"--steps to continue it)"
    before = (run / "ckpt.pt").read_bytes(), (run / "log.jsonl").read_bytes()
    radjepa.main(["--data", str(data), "--out", str(run), "--resume"])  # the same command again: a no-op
    assert f"{run / 'ckpt.pt'} is already at its last step, 2: nothing to do" in capsys.readouterr().out
    assert ((run / "ckpt.pt").read_bytes(), (run / "log.jsonl").read_bytes()) == before


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
        f"error: --resume: {out / 'ckpt.pt'} is not a RadJEPA checkpoint: cannot be loaded")


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


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_mid_step_checkpoints_that_step_and_resumes_exactly(tmp_path, monkeypatch, capsys, sig):
    """Ctrl-C (SIGINT) or SIGTERM (SLURM, timeouts, spot machines) arrives after opt.step() and before the EMA and
    step += 1 of step 3: the step completes, the checkpoint holds it, the run ends with one line and exit code 128 +
    the signal, and interrupted + resumed == uninterrupted, bit for bit."""
    data = images(tmp_path / "d", n=8)
    common = [str(a) for a in ["--data", data, "--steps", "5"] + TINY]
    radjepa.main(common + ["--out", str(tmp_path / "straight")])
    real, calls = radjepa.ema_update, []

    def ema_with_signal(target, online, m):
        calls.append(m)
        if len(calls) == 3:
            signal.raise_signal(sig)                                      # right after opt.step()
        real(target, online, m)
    monkeypatch.setattr(radjepa, "ema_update", ema_with_signal)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        radjepa.main(common + ["--out", str(tmp_path / "split")])
    assert e.value.code == 128 + sig
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"{signal.Signals(sig).name} at step 3: checkpoint {tmp_path / 'split' / 'ckpt.pt'} saved; " \
                      f"run the same command with --resume to continue" and "Traceback" not in "".join(err)
    monkeypatch.setattr(radjepa, "ema_update", real)
    ck = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 3                                                 # the interrupted step completed
    radjepa.main(common + ["--out", str(tmp_path / "split"), "--resume"])
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    for k in ("encoder", "predictor", "target_encoder"):
        for n, t in a[k].items():
            assert torch.equal(t, b[k][n]), f"{k}.{n} differs after the signal + resume"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("background", [False, True])
def test_sigterm_to_a_running_process_is_one_line_and_a_checkpoint(tmp_path, background):
    """A real `kill -TERM` to `python radjepa.py` mid-run: exit code 143, stderr ends in one line (no traceback),
    and the checkpoint holds the last finished step. background: the run is started by a script as `nohup ... &`,
    so Ctrl-C is ignored (a version that took over SIGTERM only where Ctrl-C was Python's default died at once
    there, losing every step since the last --ckpt-every)."""
    import time
    data, out = images(tmp_path / "d", n=8), tmp_path / "o"
    ignore_int = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if background else None
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "radjepa.py"), "--data", str(data), "--out", str(out),
                          "--steps", "100000"] + TINY, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=ignore_int)
    for _ in range(600):  # until it has trained a few steps
        time.sleep(0.1)
        if (out / "log.jsonl").exists() and open(out / "log.jsonl").read().count('"train"') >= 3:
            break
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("SIGTERM at step ")
    step = int(err.strip().splitlines()[-1].split()[3].rstrip(":"))
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == step >= 3


# ---------------------------------------------------------------------------------------------------------- eval.py

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny prepared folder (24 synthetic phantoms at 32 px) for eval.py."""
    out = tmp_path_factory.mktemp("prep") / "p"
    dp.main(["synthetic", str(out), "--n", "24", "--size", "32", "--workers", "1"])
    return out


def copy_prepared(prepared, dst, edit_rows=None, raw=None):
    """A copy of the prepared folder whose labels.csv rows pass through edit_rows (or are the bytes `raw`)."""
    import shutil
    shutil.copytree(prepared, dst)
    if raw is not None:
        (dst / "labels.csv").write_bytes(raw)
    elif edit_rows:
        rows = list(csv.reader(open(dst / "labels.csv", newline="")))
        with open(dst / "labels.csv", "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows(edit_rows(rows))
    return dst


def eval_refused(argv, capsys):
    capsys.readouterr()
    assert E.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    line = err[err.rfind("error: "):]                                      # after any progress bars
    assert "error: " in err and line.endswith("\n") and "\n" not in line[:-1], err
    return line.strip()


@pytest.mark.parametrize("cell, shown", [("-1", "'-1'"), ("0.5", "'0.5'"), ("yes", "'yes'"), ("1.5", "'1.5'")])
def test_eval_accepts_only_1_0_or_blank_labels(trained, prepared, tmp_path, capsys, cell, shown):
    def poison(rows):
        rows[4][4] = cell                                                  # line 5, column Effusion
        return rows
    data = copy_prepared(prepared, tmp_path / "d", poison)
    err = eval_refused(["--ckpt", trained[1] / "ckpt.pt", "--data", data, "--out", tmp_path / "o"], capsys)
    assert err == f"error: {data / 'labels.csv'} line 5, column 'Effusion': label {shown} is not 1, 0 or blank " \
                  f"(unknown); map uncertain labels first (data_prep.py --uncertain)"


@pytest.mark.parametrize("edit, why", [
    (lambda r: r[:5] + [["../../etc/passwd"] + r[5][1:]] + r[6:], "image path '../../etc/passwd' is empty or leaves "
                                                                    "the prepared folder"),
    (lambda r: r[:5] + [["/tmp/x.png"] + r[5][1:]] + r[6:], "image path '/tmp/x.png' is empty or leaves the prepared "
                                                              "folder"),
    (lambda r: r[:5] + [r[1]] + r[6:], "image 'images/p00000_0.png' repeats line 2 (it would count twice)"),
])
def test_eval_refuses_rows_that_leave_the_folder_or_repeat(trained, prepared, tmp_path, capsys, edit, why):
    data = copy_prepared(prepared, tmp_path / "d", edit)
    err = eval_refused(["--ckpt", trained[1] / "ckpt.pt", "--data", data, "--out", tmp_path / "o"], capsys)
    assert err == f"error: {data / 'labels.csv'} line 6: {why}"


def test_eval_non_utf8_labels_csv_and_bad_masks(trained, prepared, tmp_path, capsys):
    text = (prepared / "labels.csv").read_bytes().splitlines(keepends=True)
    data = copy_prepared(prepared, tmp_path / "d", raw=b"".join(text[:3] + [text[3].replace(b"p0", b"p\xff0")]
                                                               + text[4:]))
    err = eval_refused(["--ckpt", trained[1] / "ckpt.pt", "--data", data, "--out", tmp_path / "o"], capsys)
    assert err == f"error: {data / 'labels.csv'} line 4: not UTF-8 text (byte 0xff)"
    data = copy_prepared(prepared, tmp_path / "e")
    (data / "masks" / "heart" / "p00000_0.png").write_bytes(b"\x89PNG broken")
    err = eval_refused(["--ckpt", trained[1] / "ckpt.pt", "--data", data, "--task", "seg", "--out", tmp_path / "o",
                        "--seg-img-size", "32"], capsys)
    assert err.startswith(f"error: {data / 'masks' / 'heart' / 'p00000_0.png'}: not a readable image")


@pytest.mark.parametrize("flags, message", [
    (["--n-boot", "0"], "error: --n-boot must be at least 1 (got 0)"),
    (["--mask-size", "0"], "error: --mask-size must be at least 1 (got 0)"),
    (["--img-size", "-32"], "error: --img-size must be at least 1 (got -32)"),
    (["--epochs", "0"], "error: --epochs must be at least 1 (got 0)"),
    (["--device", "tpu"], "error: --device 'tpu': must be auto, cpu, cuda or cuda:N"),
])
def test_eval_flags_are_checked_before_any_work(trained, tmp_path, capsys, flags, message):
    err = eval_refused(["--ckpt", trained[1] / "ckpt.pt", "--data", tmp_path, "--out", tmp_path / "o"] + flags,
                       capsys)
    assert err == message and not (tmp_path / "o").exists()


def test_eval_out_that_is_a_file_and_nan_checkpoint(trained, prepared, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    err = eval_refused(["--ckpt", trained[1] / "ckpt.pt", "--data", prepared, "--out", tmp_path / "f"], capsys)
    assert err == f"error: --out {tmp_path / 'f'} is not a writable folder (file exists)"
    err = eval_refused(["--ckpt", trained[1] / "ckpt.pt", "--data", prepared, "--out", tmp_path / "f" / "o"], capsys)
    assert err == f"error: --out {tmp_path / 'f' / 'o'} is not a writable folder (not a directory)"
    _, out = bad_checkpoint(trained, tmp_path, lambda ck: ck["target_encoder"]["norm.weight"].fill_(float("nan")))
    err = eval_refused(["--ckpt", out / "ckpt.pt", "--data", prepared, "--out", tmp_path / "o"], capsys)
    assert err == f"error: {out / 'ckpt.pt'} is not a good checkpoint: target_encoder has NaN/Inf weights (norm.weight)"


def test_eval_checkpoint_with_a_wrongly_typed_config_or_random_bytes(trained, prepared, tmp_path, capsys):
    """Issue 22: `lr: "abc"` in a checkpoint's config was a traceback in eval; random bytes were three lines of
    torch text. Both are one line naming the file."""
    _, out = bad_checkpoint(trained, tmp_path, lambda ck: ck["config"].update(lr="abc"))
    err = eval_refused(["--ckpt", out / "ckpt.pt", "--data", prepared, "--out", tmp_path / "o"], capsys)
    assert err.startswith(f"error: {out / 'ckpt.pt'}: ") and "lr = 'abc' is not a float" in err, err
    (tmp_path / "noise.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    err = eval_refused(["--ckpt", tmp_path / "noise.pt", "--data", prepared, "--out", tmp_path / "o"], capsys)
    assert err.startswith(f"error: {tmp_path / 'noise.pt'} is not a RadJEPA checkpoint: cannot be loaded ("), err


def test_eval_feature_cache_is_keyed_by_content_not_mtime(trained, prepared, tmp_path, capsys):
    """Another checkpoint at the same path with the same size and mtime must not reuse the first one's features."""
    ckpt = tmp_path / "ckpt.pt"
    first = torch.load(trained[1] / "ckpt.pt", weights_only=True)
    torch.save(first, ckpt)
    st = os.stat(ckpt)
    argv = [str(a) for a in ["--ckpt", ckpt, "--data", prepared, "--out", tmp_path / "ev", "--task", "cls", "--probe",
                             "linear", "--n-boot", "10", "--no-baselines"]]
    assert E.main(argv) == 0
    capsys.readouterr()
    for v in first["target_encoder"].values():
        v.add_(0.01)                                                       # other weights, same layout and size
    torch.save(first, ckpt)
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(ckpt).st_size == st.st_size and os.stat(ckpt).st_mtime_ns == st.st_mtime_ns
    assert E.main(argv) == 0
    out = capsys.readouterr().out
    assert "features: cached feat_jepa" not in out and "features: cached feat_random" not in out
    assert E.main(argv) == 0                                               # the same content again: cached
    assert "features: cached feat_jepa" in capsys.readouterr().out
    assert E.content_key(str(ckpt)) != E.content_key(str(trained[1] / "ckpt.pt"))
    shutil_copy = tmp_path / "copy.pt"
    shutil_copy.write_bytes(ckpt.read_bytes())                            # a copy keeps its key
    assert E.content_key(str(shutil_copy)) == E.content_key(str(ckpt))


# ------------------------------------------------------------------------------------------------------ data_prep.py

def prep_refused(argv):
    with pytest.raises(SystemExit) as e:
        dp.main([str(a) for a in argv])
    assert "\n" not in str(e.value.code)
    return str(e.value.code)


def test_prep_never_mixes_runs_with_other_parameters(tmp_path):
    out = tmp_path / "p"
    dp.main(["synthetic", str(out), "--n", "6", "--size", "32", "--workers", "1"])
    before = {p.name: p.read_bytes() for p in (out / "images").glob("*.png")}
    for flags, diff in ((["--seed", "1"], "seed 0 -> 1"), (["--size", "48"], "size 32 -> 48")):
        msg = prep_refused(["synthetic", out, "--n", "6", "--size", "32", "--workers", "1"] + flags)
        assert msg == f"data_prep: error: {out} was prepared with other parameters ({diff}): its images would not " \
                      f"match; rerun with --overwrite to start over, or use another folder"
    assert {p.name: p.read_bytes() for p in (out / "images").glob("*.png")} == before
    src = images(tmp_path / "site" / "pat1", n=2).parent
    msg = prep_refused(["folder", src, out, "--size", "32", "--workers", "1"])
    assert f"source synthetic -> folder, src None -> {src.resolve()}" in msg
    # --overwrite rebuilds: the same bytes as a fresh run with the new seed
    dp.main(["synthetic", str(out), "--n", "6", "--size", "32", "--workers", "1", "--seed", "1", "--overwrite"])
    dp.main(["synthetic", str(tmp_path / "fresh"), "--n", "6", "--size", "32", "--workers", "1", "--seed", "1"])
    assert {p.name: p.read_bytes() for p in (out / "images").glob("*.png")} == \
           {p.name: p.read_bytes() for p in (tmp_path / "fresh" / "images").glob("*.png")}
    # another --n rebuilds what differs: fewer images -> the extra ones (and their masks) go
    dp.main(["synthetic", str(out), "--n", "3", "--size", "32", "--workers", "1", "--seed", "1"])
    listed = {Path(r["image"]).name for r in csv.DictReader(open(out / "labels.csv"))}
    assert len(listed) == 3 and {p.name for p in (out / "images").glob("*.png")} == listed
    assert {p.name for p in (out / "masks").glob("*/*.png")} <= listed
    assert json.loads((out / "meta.json").read_text())["params"]["seed"] == 1


def test_prep_folder_skips_ct_and_mr_unless_asked(tmp_path):
    pytest.importorskip("pydicom")
    from test_data_prep import dicom
    src = tmp_path / "site"
    a = (np.arange(40 * 32).reshape(40, 32) % 4096).astype(np.uint16)
    dicom(src / "p1" / "cxr.dcm", a, bits=12)                              # Modality CR
    dicom(src / "p2" / "ct.dcm", a, bits=12, Modality="CT")
    dicom(src / "p3" / "mr.dcm", a, bits=12, Modality="MR")
    dp.main(["folder", str(src), str(tmp_path / "o"), "--size", "32", "--workers", "1"])
    assert [p.name for p in (tmp_path / "o" / "images").iterdir()] == ["p1__cxr.png"]
    reasons = {Path(s["file"]).name: s["reason"] for s in json.loads((tmp_path / "o" / "meta.json").read_text())
               ["skipped"]}
    assert reasons == {"ct.dcm": "DICOM modality CT is not a radiograph (CR/DX/DR/RG); add --modality CT to convert "
                                 "it anyway",
                       "mr.dcm": "DICOM modality MR is not a radiograph (CR/DX/DR/RG); add --modality MR to convert "
                                 "it anyway"}
    dp.main(["folder", str(src), str(tmp_path / "all"), "--size", "32", "--workers", "1", "--modality", "all"])
    assert len(list((tmp_path / "all" / "images").iterdir())) == 3


def test_prep_folder_non_ascii_and_clashing_names(tmp_path):
    src = tmp_path / "site"
    for i, folder in enumerate(["Müller", "Mäller", "p 1", "p_1", "患者"]):
        images(src / folder, n=1, seed=i)                                  # each holds im0.png
    os.symlink(src / "p_1" / "im0.png", src / "p_1" / "link.png")         # a link to a file already listed
    dp.main(["folder", str(src), str(tmp_path / "o"), "--size", "32", "--workers", "1"])
    rows = list(csv.DictReader(open(tmp_path / "o" / "labels.csv", encoding="utf-8")))
    ids = sorted(Path(r["image"]).stem for r in rows)
    assert len(ids) == 5 and {"Müller__im0", "Mäller__im0", "p_1__im0", "患者__im0"} <= set(ids)
    assert any(i.startswith("p_1__im0_") for i in ids)                    # 'p 1' gets a stable hash suffix
    assert {r["patient"] for r in rows} == {"Müller", "Mäller", "p 1", "p_1", "患者"}
    dp.main(["folder", str(src), str(tmp_path / "o"), "--size", "32", "--workers", "1"])   # resume: same ids
    assert sorted(Path(r["image"]).stem for r in csv.DictReader(open(tmp_path / "o" / "labels.csv"))) == ids
    # the trainer reads it
    assert len(radjepa.list_images(str(tmp_path / "o"))) == sum(r["split"] == "train" for r in rows)


def test_prep_non_utf8_csv_and_bad_n(tmp_path):
    (tmp_path / "nih").mkdir()
    (tmp_path / "nih" / "Data_Entry_2017.csv").write_bytes(b"Image Index,Finding Labels,Patient ID\n"
                                                           b"a.png,No Finding,1\nb.png,Hernia\xe9,2\n")
    msg = prep_refused(["nih", tmp_path / "nih", tmp_path / "o", "--size", "32", "--workers", "1"])
    assert msg == f"data_prep: error: {tmp_path / 'nih' / 'Data_Entry_2017.csv'} line 3: not UTF-8 text " \
                  f"(byte 0xe9)"
    assert prep_refused(["synthetic", tmp_path / "s", "--n", "0"]) == "data_prep: error: --n must be >= 1 (got 0)"


def test_out_inside_the_data_is_never_read_as_data(tmp_path):
    """Siblings of the symlink hole: OUT inside --data (trainer) or inside SRC (data_prep) must not feed its own
    pictures back in as data."""
    data = images(tmp_path / "d", n=3)
    images(data / "run", n=2, seed=1)                                     # masks.png, loss.png ... of a run
    assert len(radjepa.list_images(str(data), str(data / "run"))) == 3
    images(tmp_path / "nih" / "images", n=2)
    images(tmp_path / "nih" / "prep" / "images", n=2)                      # a prepared folder with the same names
    found = dp.index_files(tmp_path / "nih", {".png"}, tmp_path / "nih" / "prep")
    assert sorted(Path(p).parent for p in found.values()) == [tmp_path / "nih" / "images"] * 2
    with pytest.raises(ValueError, match="is the --data folder: its pictures would become training images"):
        radjepa.list_images(str(data), str(data))
    msg = prep_refused(["folder", data, data, "--size", "32", "--workers", "1"])
    assert msg == f"data_prep: error: {data} holds SRC {data}: a rerun would read its own output as source images"


def test_eval_refuses_a_patient_in_two_splits_and_an_empty_train_split(trained, prepared, tmp_path, capsys):
    def leak(rows):
        rows[5][1], rows[5][2] = rows[1][1], "test" if rows[1][2] != "test" else "train"   # line 6 = line 2's patient
        return rows
    data = copy_prepared(prepared, tmp_path / "d", leak)
    rows = list(csv.reader(open(data / "labels.csv")))
    first = next(i for i, r in enumerate(rows) if r[1] == rows[5][1]) + 1
    err = eval_refused(["--ckpt", trained[1] / "ckpt.pt", "--data", data, "--out", tmp_path / "o"], capsys)
    assert err == f"error: {data / 'labels.csv'} line 6: patient {rows[5][1]!r} is in {rows[5][2]} here and in " \
                  f"{rows[first - 1][2]} on line {first}; splits must be by patient"
    data = copy_prepared(prepared, tmp_path / "e", lambda rows: [r for r in rows if r[2] != "train"])
    err = eval_refused(["--ckpt", trained[1] / "ckpt.pt", "--data", data, "--out", tmp_path / "o"], capsys)
    assert err.startswith(f"error: {data / 'labels.csv'}: no image in the train split")


def test_prep_source_label_cells_are_never_guessed(tmp_path):
    from test_data_prep import CHEXPERT_HEADER, png, write_csv
    src = tmp_path / "CheXpert-v1.0-small"
    rel = "train/patient00001/study1/view1_frontal.jpg"
    png(src / rel)
    vals = [""] * len(dp.CHEXPERT_LABELS)
    vals[dp.CHEXPERT_LABELS.index("Edema")] = "maybe"
    write_csv(src / "train.csv", CHEXPERT_HEADER, [[f"CheXpert-v1.0-small/{rel}", "F", 60, "Frontal", "AP"] + vals])
    msg = prep_refused(["chexpert", src, tmp_path / "o", "--size", "32", "--workers", "1"])
    assert msg == f"data_prep: error: {src / 'train.csv'}, CheXpert-v1.0-small/{rel}: label 'Edema' is 'maybe', not " \
                  f"1, 0, -1 or blank"


def test_torchrun_process_whose_share_is_unreadable_stays_in_step(tmp_path):
    """Sibling of item 4 under torchrun: a process whose whole share of a batch is unreadable used to skip the step's
    collectives, so the processes' all-reduces paired up across different steps (then hung at the end). Now it runs
    a stand-in that weighs nothing: 2 gloo processes compute what 1 process computes."""
    data = images(tmp_path / "d", n=4)
    first = list(radjepa.StepBatches(4, 4, 0, 0, 3, rank=1, world=2))[0]   # rank 1's share of step 0
    for i, _ in first:
        (data / f"im{i}.png").write_bytes(b"\x89PNG unreadable")
    common = [os.path.join(ROOT, "radjepa.py"), "--data", str(data), "--steps", "3"] + TINY
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    radjepa.main(common[1:] + ["--out", str(tmp_path / "one")])           # 1 process, in-process
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29523"]
                         + common + ["--out", str(tmp_path / "two")], capture_output=True, text=True, env=env,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    la, lb = ([r["loss"] for r in map(json.loads, open(tmp_path / o / "log.jsonl")) if "loss" in r]
              for o in ("one", "two"))
    assert len(la) == len(lb) == 3
    np.testing.assert_allclose(la, lb, rtol=1e-4)
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["encoder"]
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["encoder"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)


# ------------------------------------------------------------------------------------------- issue 22: one validator
def test_one_checkpoint_validator_for_export_resume_and_eval(trained, tmp_path):
    """`radjepa.py export` once wrote a timm model from a NaN checkpoint and exited 0 (eval and --resume refused
    it); a negative step, a missing rng key (no longer written: resume is exact without it) and a wrongly typed
    config value are each one line wherever the checkpoint is read."""
    data, run = trained
    _, nan = bad_checkpoint(trained, tmp_path / "nan", lambda ck: ck["target_encoder"]["norm.weight"].fill_(float("nan")))
    with pytest.raises(SystemExit) as e:
        radjepa.export_main([str(nan / "ckpt.pt"), str(tmp_path / "timm")])
    assert str(e.value) == f"error: {nan / 'ckpt.pt'} is not a good checkpoint: target_encoder has NaN/Inf " \
                           f"weights (norm.weight)"
    assert not (tmp_path / "timm").exists()
    _, neg = bad_checkpoint(trained, tmp_path / "neg", lambda ck: ck.update(step=-1))
    assert refused(["--data", data, "--out", neg, "--resume", "--steps", "4"]) == \
        f"error: --resume: {neg / 'ckpt.pt'}: its step -1 is not an integer >= 0"
    _, typed = bad_checkpoint(trained, tmp_path / "typed", lambda ck: ck["config"].update(lr="abc"))
    with pytest.raises(ValueError, match=r"^its config: lr = 'abc' is not a float$"):
        radjepa.load_encoder(str(typed / "ckpt.pt"))
    _, no_rng = bad_checkpoint(trained, tmp_path / "norng", lambda ck: ck.pop("rng", None))
    radjepa.main([str(a) for a in ["--data", data, "--out", no_rng, "--resume", "--steps", "3"] + TINY])
    assert torch.load(no_rng / "ckpt.pt", weights_only=True)["step"] == 3

    def written_before_the_move(ck):  # the old checkpoints also held the global RNG states
        ck["rng"] = dict(torch=torch.get_rng_state(), python=random.getstate())
    _, old = bad_checkpoint(trained, tmp_path / "old", written_before_the_move)
    assert radjepa.load_encoder(str(old / "ckpt.pt")).embed_dim == 64
    radjepa.main([str(a) for a in ["--data", data, "--out", old, "--resume", "--steps", "3"] + TINY])
    assert torch.load(old / "ckpt.pt", weights_only=True)["step"] == 3


def test_a_finished_run_is_never_silently_restarted(tmp_path):
    """Re-running a training command without --resume (the quick start invites it) once appended a second run to
    log.jsonl, rewrote config.json and would overwrite ckpt.pt: refused in one line naming the step and the two ways
    on; --restart starts over on purpose, and its log holds one run."""
    data, out = images(tmp_path / "d", n=4), tmp_path / "o"
    argv = [str(a) for a in ["--data", data, "--out", out, "--steps", "2"] + TINY]
    radjepa.main(argv)
    before = {f: (out / f).read_bytes() for f in ("ckpt.pt", "log.jsonl", "config.json")}
    assert refused(argv) == f"error: --out {out} already holds a run (at step 2): add --resume to continue it, " \
                            f"or --restart to start over (its files are replaced)"
    assert {f: (out / f).read_bytes() for f in before} == before
    radjepa.main(argv + ["--restart"])
    recs = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["type"] for r in recs] == ["header", "train", "train"]


def test_resumed_log_reads_like_an_uninterrupted_one(tmp_path):
    """Records written after the checkpoint a run resumes from are redone, so they are dropped: the resumed log has
    the same steps and losses as the straight run's (a header per start)."""
    data = images(tmp_path / "d", n=8)
    common = [str(a) for a in ["--data", data, "--steps", "6", "--ckpt-every", "2"] + TINY]
    radjepa.main(common + ["--out", str(tmp_path / "straight")])
    radjepa.main(common + ["--out", str(tmp_path / "split2"), "--stop-at", "2"])
    radjepa.main(common + ["--out", str(tmp_path / "split2"), "--resume", "--stop-at", "4"])
    with open(tmp_path / "split2" / "log.jsonl", "a") as f:  # a record of step 5 that no checkpoint holds
        f.write(json.dumps({"type": "train", "step": 5, "loss": 9.9}) + "\n")
    radjepa.main(common + ["--out", str(tmp_path / "split2"), "--resume"])

    def losses(run):
        return [(r["step"], round(r["loss"], 6)) for r in map(json.loads, open(tmp_path / run / "log.jsonl"))
                if r.get("type") == "train"]
    assert losses("split2") == losses("straight")


def test_a_rarely_possible_masking_is_refused_before_any_work(tmp_path):
    """64 px / patch 16 is a 4x4 grid: with --min-ctx 10, 1 draw in 10 leaves enough context, so the 100 tries
    per image all fail about once in 37,000 images: a crash hours into a run. Refused up front instead."""
    flags = TINY + ["--img-size", "64", "--tgt-scale", "0.15", "0.2", "--ctx-scale", "0.85", "1", "--n-targets", "4",
                    "--min-ctx", "10"]                           # I-JEPA's masking on a 4x4 grid
    msg = refused(["--data", images(tmp_path / "d", n=1), "--out", tmp_path / "o", "--steps", "10"] + flags)
    assert msg.startswith("error: masking: only ") and "of 100 draws leave >= 10 context patches on a 4x4 grid" in msg
    assert not (tmp_path / "o").exists()
