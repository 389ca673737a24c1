"""The GPU path's hot-loop properties, checked on CPU (issue 9, items 0.5 and 0.6): the residual stream stays fp32
under bf16 autocast, the training loop reads nothing from the device except on log/checkpoint steps, and the Triton
path builds no padding indices."""
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import radjepa
from radjepa import Predictor, Seqs, ViT, pack_masks, sample_masks
from test_radjepa import TINY, blob_images

aten = torch.ops.aten


pytestmark = pytest.mark.usefixtures("torch_path")   # conftest.py


def test_residual_stream_stays_fp32_under_bf16_autocast():
    """bf16 autocast makes matmul outputs bf16; the position table must not drag the residual stream down with it
    (the official code keeps it fp32). Checked at the training grid (cached table) and another grid (computed)."""
    torch.manual_seed(0)
    enc, pred = ViT(16, 64, 2, 2, ref_grid=(4, 4)), Predictor(64, 32, 1, 2, grid=(4, 4))
    dtypes = []
    for blk in list(enc.blocks) + list(pred.blocks):
        blk.register_forward_pre_hook(lambda m, args: dtypes.append(args[0].dtype))
    gen = torch.Generator().manual_seed(0)
    masks = [sample_masks(gen, (4, 4), 4, min_ctx=4) for _ in range(2)]
    mb = pack_masks(masks, 16).to("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert enc.blocks[0].attn.qkv(torch.zeros(1, 64)).dtype == torch.bfloat16  # autocast is really on
        enc(torch.rand(2, 1, 64, 64))                                                # full image, cached table
        enc(torch.rand(2, 1, 96, 96))                                                # another grid
        z = pred(enc(torch.rand(2, 1, 64, 64), mb.ctx_idx, mb.ctx_seqs), mb)
    assert len(dtypes) == 2 * 3 + 1 and all(d == torch.float32 for d in dtypes), dtypes
    assert z.dtype == torch.bfloat16                                                 # only the output projection
    assert "pos" not in enc.state_dict() and "pos" not in pred.state_dict()         # checkpoints are unchanged


class ScalarReads(TorchDispatchMode):
    """Counts host reads of tensor values (.item(), float(t), bool(t), torch.equal) and ops whose output size depends
    on values (nonzero, masked_select, indexing with a bool mask): each one is a device sync on CUDA. Reads inside
    torch.optim (AdamW's CPU step counter) and the DataLoader are not device reads."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func is aten.index.Tensor and any(
            getattr(i, "dtype", None) == torch.bool for i in (args[1] if len(args) > 1 else []))
        if bool_index or func in (aten._local_scalar_dense.default, aten.equal.default, aten.nonzero.default,
                                  aten.masked_select.default):
            frames = [f.filename.replace("\\", "/") for f in traceback.extract_stack()]
            if not any("torch/optim" in f or "torch/utils/data" in f for f in frames):
                self.n += 1
        return func(*args, **(kwargs or {}))


def test_training_loop_reads_the_device_only_on_log_steps(tmp_path):
    """Two runs with one log/checkpoint step each, 4 and 8 steps: the same number of host reads. Any per-step
    .item() / bool() in the loop (or in Seqs, the model, the loss) would make the 8-step run read more."""
    data = blob_images(tmp_path / "data", n=8)
    counts = []
    for steps in (4, 8):
        args = ["--data", str(data), "--out", str(tmp_path / f"r{steps}"), "--steps", str(steps)] + TINY
        args += ["--log-every", str(steps), "--ckpt-every", str(steps), "--workers", "1"]  # masks drawn in a worker
        with ScalarReads() as reads:
            radjepa.main(args)
        counts.append(reads.n)
    assert counts[0] == counts[1] and counts[0] > 0, counts


def test_triton_path_builds_no_padding_indices():
    pytest.importorskip("triton")
    ok, why = __import__("kernels").available()
    if not ok:
        pytest.skip(why)
    assert hasattr(Seqs([3, 5], "cpu"), "slot")       # the PyTorch attention pads inside attention
    radjepa.use_kernels(True)
    s = Seqs(torch.tensor([3, 5, 1]), "cpu")
    assert not hasattr(s, "slot") and s.cu.tolist() == [0, 3, 8, 9] and s.max_len == 5 and not s.uniform
