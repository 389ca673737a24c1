"""Issue 25: one run, whatever the hardware. Gradient accumulation equals one big batch; two torchrun "nodes"
equal one process; a run resumed on another number of processes or another --accum continues the same run; a
change of global batch on resume is refused. Tiny models, fp32, a few steps: equal to round-off."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import radjepa
from test_radjepa import ROOT, TINY, blob_images, params

pytestmark = pytest.mark.usefixtures("torch_path")   # conftest.py
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def losses(out):
    return [r["loss"] for r in map(json.loads, open(out / "log.jsonl")) if r.get("type") == "train"]


def assert_same_run(a, b, atol=1e-5):
    """Same losses at every step and the same weights (encoder, predictor, EMA target) at the end."""
    np.testing.assert_allclose(losses(a), losses(b), rtol=1e-4, atol=1e-7)
    pa, ca = params(a / "ckpt.pt")
    pb, cb = params(b / "ckpt.pt")
    assert ca["step"] == cb["step"]
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], atol=atol, rtol=1e-3, msg=k)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, nproc=2, timeout=300):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                        f"--master_port={free_port()}", os.path.join(ROOT, "radjepa.py")] + args,
                       capture_output=True, text=True, env=ENV, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return blob_images(tmp_path_factory.mktemp("scale") / "data", n=12)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """The reference: 4 steps of a global batch of 6 in one process, no accumulation."""
    out = tmp_path_factory.mktemp("straight") / "run"
    radjepa.main(TINY + ["--data", str(data), "--out", str(out), "--steps", "4", "--batch-size", "6"])
    return out


@pytest.mark.parametrize("accum", [2, 3, 4])  # 6 images as 3+3, 2+2+2, and 1+2+1+2 (uneven micro-batches)
def test_accum_equals_one_big_batch(data, straight, tmp_path, accum):
    """Each image keeps its own context and target sizes, so micro-batches pack different numbers of target
    tokens: the loss of each is weighted by its share of the whole batch's tokens, and K micro-batches give the
    big batch's gradient, loss, schedules and EMA (one optimizer step, one EMA step per K)."""
    out = tmp_path / "accum"
    radjepa.main(TINY + ["--data", str(data), "--out", str(out), "--steps", "4", "--batch-size", "6",
                         "--accum", str(accum)])
    assert_same_run(straight, out)


def test_micro_batches_split_each_step_and_cover_it_once():
    """The sampler hands out the same global batch per step, whatever the processes and --accum."""
    whole = list(radjepa.StepBatches(10, 8, 0, 0, 3))  # one process, no accumulation: a list per step
    for world in (1, 2):
        for accum in (1, 2, 4):
            parts = [list(radjepa.StepBatches(10, 8, 0, 0, 3, rank=r, world=world, accum=accum))
                     for r in range(world)]
            assert all(len(p) == 3 * accum for p in parts)
            steps = [sum((p[s * accum + k] for p in parts for k in range(accum)), []) for s in range(3)]
            assert [sorted(s) for s in steps] == [sorted(s) for s in whole]


def test_two_torchrun_nodes_equal_one_process(data, straight, tmp_path):
    """Two "nodes" of one process each, joined by c10d rendezvous on this machine, as on a cluster:
    torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT (README: several machines)."""
    out, port = tmp_path / "nodes", free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=scale-test",
           os.path.join(ROOT, "radjepa.py")] + TINY + ["--data", str(data), "--out", str(out), "--steps", "4",
                                                        "--batch-size", "6"]
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(2)]
    results = [n.communicate(timeout=300) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), [e[-2000:] for _, e in results]
    assert any("2 process(es)" in o for o, _ in results)
    assert_same_run(straight, out, atol=1e-4)


def test_resume_on_another_world_size_and_accum_continues_the_same_run(data, straight, tmp_path):
    """Started on 2 processes, resumed on 1 with --accum 2, and the reverse: the same run as the straight one
    (the data is a function of the step, the schedules too, the batch is global)."""
    common = TINY + ["--data", str(data), "--steps", "4", "--batch-size", "6"]
    a = tmp_path / "two_then_one"
    torchrun(common + ["--out", str(a), "--stop-at", "2"])
    radjepa.main(common + ["--out", str(a), "--resume", "--accum", "2"])
    assert_same_run(straight, a, atol=1e-4)
    b = tmp_path / "one_then_two"
    radjepa.main(common + ["--out", str(b), "--stop-at", "2", "--accum", "3"])
    torchrun(common + ["--out", str(b), "--resume"])
    assert_same_run(straight, b, atol=1e-4)


def test_a_change_of_global_batch_on_resume_is_refused(data, straight, tmp_path):
    out = tmp_path / "run"
    radjepa.main(TINY + ["--data", str(data), "--out", str(out), "--steps", "4", "--batch-size", "6",
                         "--stop-at", "2"])
    with pytest.raises(SystemExit) as e:
        radjepa.main(["--data", str(data), "--out", str(out), "--resume", "--batch-size", "12"])
    assert str(e.value) == "error: --resume with another global batch: --batch-size 12 (checkpoint: 6); " \
                           "use --accum or more processes to fit it in memory, or another --out"
