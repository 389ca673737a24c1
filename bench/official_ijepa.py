"""
Time the official I-JEPA code's own training step (facebookresearch/ijepa `src/train.py`, run unmodified).

    python -m bench.official_ijepa --model vit_base --patch 16 --img-size 224 --batch 128 --out row.json
    python -m bench.official_ijepa --model vit_tiny --img-size 96 --batch 4 --pred-width 48 --pred-depth 1 \\
        --min-keep 4 --steps 3 --warmup 1 --out /tmp/row.json                # CPU smoke, a few seconds

The repository is NOT part of this project and is never committed: put a copy in the git-ignored `third_party/ijepa`
(or pass --repo), e.g. `git clone https://github.com/facebookresearch/ijepa third_party/ijepa`.

What runs is the repository's `src.train.main(args)` itself: its `init_model` (ViT + predictor), `init_opt`
(AdamW, schedules, and under bf16 its GradScaler), its DistributedDataParallel wrapping (a 1-process group is
created first: NCCL on CUDA, gloo on CPU), its `MaskCollator` (the masks are truncated to the batch minimum by it),
and its loop body: target forward + layer_norm + apply_masks, context encoder + predictor, smooth-L1 + AllReduce,
backward, optimizer step, grad_logger, EMA, CSV log line. Only the *data source* is replaced. `src.train` imports
`make_imagenet1k` (an ImageNet folder read by torchvision) and `make_transforms` (torchvision); stand-ins for those
two modules are registered before `src.train` is imported. The stand-in loader yields ONE batch of random images
already on the device (as the RadJEPA benchmark uses), with masks drawn by the official collator ahead of timing (in
the official run they come from loader worker processes, off the timed path). After the timed steps it raises a
private exception, so the run ends before the official end-of-epoch checkpoint (GBs for ViT-B).

Timing: ms per step = wall time from handing a batch to the loop until it asks for the next (one whole loop
iteration; the official step ends with `float(loss)`, a device sync, so this is device time too). On CUDA the
official CSV log's own `time (ms)` (CUDA events around its train_step) is reported beside it. Result: one JSON
object (see `run`).
"""
import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import types

import plumbing

DEFAULT_REPO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "third_party", "ijepa")


class _Done(Exception):
    """Raised by the stand-in loader after the last timed step: ends src.train.main before its checkpoint."""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_repo(repo):
    """-> absolute path of an official I-JEPA checkout, or raise FileNotFoundError with what to do."""
    repo = os.path.abspath(repo or DEFAULT_REPO)
    if not os.path.isfile(os.path.join(repo, "src", "train.py")):
        raise FileNotFoundError(f"official I-JEPA code not found at {repo} (no src/train.py): get it with "
                                f"`git clone https://github.com/facebookresearch/ijepa {repo}` (git-ignored, never "
                                f"committed)")
    return repo


def run(model="vit_base", patch=16, img_size=224, batch=128, pred_width=384, pred_depth=6, steps=10, warmup=3,
        min_keep=10, repo=None, device=None, seed=0, between=None):
    """Run the official training loop for warmup + steps iterations on random images; return a result dict:
    ms_per_step (median of the timed steps, wall), ms_per_step_csv (official CUDA-event time, CUDA only),
    img_per_s, ctx_tokens / tgt_tokens per image (after the official truncation), peak_mem_gb (CUDA only).
    between: optional callable run after each timed iteration, off the clock (to interleave another benchmark)."""
    import torch
    repo = find_repo(repo)
    cuda = torch.cuda.is_available() if device is None else device == "cuda"
    dev = torch.device("cuda:0" if cuda else "cpu")
    torch.manual_seed(seed)
    imgs = torch.randn(batch, 3, img_size, img_size, device=dev)  # the official model is RGB
    state = dict(times=[], ctx=[], tgt=[])

    class Loader:
        """Stand-in for the official DataLoader: the same random images every step, official masks per step."""

        def __init__(self, collator):
            dummy = [(torch.zeros(1), 0)] * batch  # the collator stacks these; only its masks are used
            self.batches = []
            for _ in range(warmup + steps):
                _, enc, pred = collator(dummy)
                self.batches.append(([imgs, None], enc, pred))
                state["ctx"].append(enc[0].shape[1])
                state["tgt"].append(pred[0].shape[1])

        def __len__(self):
            return len(self.batches)

        def __iter__(self):
            for k, b in enumerate(self.batches):
                t0 = time.perf_counter()
                yield b  # the official loop body runs here; it ends with float(loss), a device sync
                state["times"].append(time.perf_counter() - t0)
                if between is not None and k >= warmup:
                    between()  # side-by-side runs: another benchmark's step, outside this row's clock
            raise _Done

    def make_imagenet1k(transform=None, batch_size=None, collator=None, **_):
        sampler = types.SimpleNamespace(set_epoch=lambda epoch: None)
        return None, Loader(collator), sampler

    sys.path.insert(0, repo)
    sys.modules["src.datasets.imagenet1k"] = types.SimpleNamespace(make_imagenet1k=make_imagenet1k)
    sys.modules["src.transforms"] = types.SimpleNamespace(make_transforms=lambda **kw: None)
    import torch.distributed as dist
    if not dist.is_initialized():  # the official code wraps every model in DDP: give it a 1-process group
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                                rank=0, world_size=1)
    import logging
    import src.train as official  # noqa: E402  (the repository's own module)
    logging.getLogger().setLevel(logging.WARNING)  # it prints the model and a line per 10 steps at INFO
    folder = tempfile.mkdtemp(prefix="ijepa_official_")
    args = dict(
        meta=dict(use_bfloat16=cuda, model_name=model, load_checkpoint=False, read_checkpoint=None, copy_data=False,
                  pred_depth=pred_depth, pred_emb_dim=pred_width),
        data=dict(batch_size=batch, color_jitter_strength=0.0, crop_scale=[0.3, 1.0], crop_size=img_size,
                  image_folder="unused", num_workers=0, pin_mem=False, root_path="unused",
                  use_color_distortion=False, use_gaussian_blur=False, use_horizontal_flip=False),
        logging=dict(folder=folder, write_tag="jepa"),
        mask=dict(allow_overlap=False, aspect_ratio=[0.75, 1.5], enc_mask_scale=[0.85, 1.0], min_keep=min_keep,
                  num_enc_masks=1, num_pred_masks=4, patch_size=patch, pred_mask_scale=[0.15, 0.2]),
        optimization=dict(ema=[0.996, 1.0], epochs=1, final_lr=1e-6, final_weight_decay=0.4, ipe_scale=1.0,
                          lr=0.001, start_lr=0.0002, warmup=40, weight_decay=0.04))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        official.main(args)
        raise RuntimeError("the official loop ended without reaching the stand-in loader's end")
    except _Done:
        pass
    step_ms = [t * 1e3 for t in state["times"][warmup:]]
    csv_ms = []
    with open(os.path.join(folder, "jepa_r0.csv")) as f:
        rows = [line.strip().split(",") for line in f][1:]
        csv_ms = [float(r[-1]) for r in rows[warmup:] if float(r[-1]) >= 0]  # -1 on CPU (no CUDA events)
    ms = statistics.median(step_ms)
    N = (img_size // patch) ** 2
    return dict(path="official I-JEPA (src/train.py)", model=model, patch=patch, img_size=img_size, batch=batch,
                pred_width=pred_width, pred_depth=pred_depth, steps=steps, warmup=warmup, device=str(dev),
                ms_per_step=ms, ms_per_step_all=step_ms, ms_per_step_csv=statistics.median(csv_ms) if csv_ms else None,
                img_per_s=batch / ms * 1e3, ctx_tokens=statistics.mean(state["ctx"][warmup:]),
                tgt_tokens=statistics.mean(state["tgt"][warmup:]), n_patches=N,
                peak_mem_gb=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
                dtype="bf16 autocast (+ its GradScaler)" if cuda else "fp32")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repo", default=DEFAULT_REPO, help="checkout of facebookresearch/ijepa (git-ignored)")
    p.add_argument("--model", default="vit_base", help="official model name: vit_tiny|vit_small|vit_base|vit_large")
    p.add_argument("--patch", type=int, default=16, help="patch size")
    p.add_argument("--img-size", type=int, default=224, help="crop size (square)")
    p.add_argument("--batch", type=int, default=128, help="batch size")
    p.add_argument("--pred-width", type=int, default=384, help="predictor width (pred_emb_dim)")
    p.add_argument("--pred-depth", type=int, default=6, help="predictor depth")
    p.add_argument("--min-keep", type=int, default=10, help="mask min_keep (smaller for tiny grids)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--out", default=None, help="write the result JSON here (default: print it)")
    a = p.parse_args(argv)
    try:
        r = run(a.model, a.patch, a.img_size, a.batch, a.pred_width, a.pred_depth, a.steps, a.warmup, a.min_keep,
                a.repo, a.device)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}")
    text = json.dumps(r, indent=2)
    if a.out:
        try:
            plumbing.write_text(a.out, text + "\n")
        except plumbing.BadInput as e:  # a folder, a path under a file, a full disk: one line
            raise SystemExit(f"error: --out: {e}") from None
    print(text)
    return r


if __name__ == "__main__":
    main()
