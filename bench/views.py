"""
Has a view collapsed? Each image's mean token, per view, for a checkpoint's encoders.

    python -m bench.views CKPT [CKPT ...] --data DIR [--images 256] [--random-init] [--out DIR]

A JEPA encoder sees two views of an image: the context (the patches training's masks keep) and, in the target
branch, the whole image. A regulariser on one view says nothing of the other, and an encoder can tell them apart
(the context has holes and fewer tokens). For the online encoder and the target encoder of each checkpoint, on
the first --images training images of DIR (whole images resized to the training size; the context view with the
masks training draws for global samples 0..n-1, so a run's own masks), each image's mean token [n, D] gives:

  std      the per-dimension std across images, averaged over dimensions: ~0 when every image maps to nearly
           one embedding (collapse), whatever the token-level effective rank says (positions alone can keep it
           high: the tokens vary across the image while the images do not vary)
  SIGReg   examples/lejepa.py's Epps-Pulley distance from N(0, I) (fixed directions, seed 0): ~1/n for a
           Gaussian cloud, ~0.41 for a constant at 0, more for a constant elsewhere

It found the shortcut of examples/lejepa.py's first --no-ema version (BENCHMARKS.md section 17): the context
view Gaussian (SIGReg 0.05), the whole image collapsed (std 0.02, SIGReg 1.1). --out DIR writes views.json and
views.md; the table is printed either way.
"""
import argparse
import os
import sys

import numpy as np
import torch

if __package__ in (None, ""):  # `python bench/views.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import plumbing  # noqa: E402
import radjepa  # noqa: E402
from bench import save_results  # noqa: E402
from examples import lejepa  # noqa: E402


def load_images(data, n, size):
    """The first n readable training images of data, whole, resized to size x size: [n, 1, size, size]."""
    imgs = []
    for path in plumbing.list_images(data):
        try:
            imgs.append(plumbing.load_whole(path, size))
        except plumbing.BadImage:
            continue
        if len(imgs) == n:
            break
    if len(imgs) < 2:
        raise plumbing.BadInput(f"{data}: {len(imgs)} readable image(s); the spread across images needs >= 2")
    return torch.from_numpy(np.stack(imgs))[:, None]


@torch.no_grad()
def view_stats(enc, imgs, batch):
    """enc: a ViT; batch: the packed masks of imgs. -> {view: (std, sigreg)} of each image's mean token."""
    views = {"context": lejepa.pooled(enc(imgs, batch.ctx_idx, batch.ctx_seqs), batch),
             "whole image": enc(imgs).float().mean(1)}
    return {v: (z.std(0).mean().item(), lejepa.sigreg(z, gen=torch.Generator().manual_seed(0)).item())
            for v, z in views.items()}


def measure(ckpts, data, n, random_init=False):
    rows, by_size = [], {}  # the images are read once per training size
    for i, path in enumerate(ckpts):
        ck = radjepa.read_checkpoint(path)
        c = radjepa.make_config({}, ck["config"])
        if c.img_size not in by_size:
            by_size[c.img_size] = load_images(data, n, c.img_size)
        imgs = by_size[c.img_size]
        col = radjepa.Collate(c)  # training's masks of global samples 0..n-1, as the run drew them
        batch = radjepa.pack_masks([col.masks_for(g) for g in range(len(imgs))], c.grid[0] * c.grid[1]).to("cpu")
        enc = radjepa.load_encoder(path)  # the target encoder, eval mode
        encoders = [("target", enc)]
        if "encoder" in ck:
            online = radjepa.build_encoder(c).eval()
            plumbing.load_state(online, ck, "encoder", path)
            encoders.insert(0, ("online", online))
        if random_init and i == 0:
            encoders.insert(0, ("random init", radjepa.load_encoder(path, random_init=True, seed=c.seed)))
        for name, e in encoders:
            rows.append(dict(ckpt=path, encoder=name, images=len(imgs), step=ck["step"],
                             views={v: dict(std=s, sigreg=r) for v, (s, r) in view_stats(e, imgs, batch).items()}))
    return dict(data=data, rows=rows)


def to_markdown(res):
    lines = [f"Each image's mean token, per view ({res['rows'][0]['images']} images of {res['data']}): std across "
             "images (mean over dimensions) / SIGReg (a Gaussian cloud ~1/n, a constant at 0: 0.41)", "",
             "| checkpoint | step | encoder | context: std | context: SIGReg | whole image: std | whole image: SIGReg |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        v = r["views"]
        lines.append(f"| {r['ckpt']} | {r['step']} | {r['encoder']} | {v['context']['std']:.3f} | "
                     f"{v['context']['sigreg']:.3f} | {v['whole image']['std']:.3f} | {v['whole image']['sigreg']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("ckpts", nargs="+", help="checkpoints (OUT/ckpt.pt of radjepa.py or examples/lejepa.py)")
    p.add_argument("--data", required=True, help="images, or a prepared folder (its train split)")
    p.add_argument("--images", type=int, default=256, help="how many images (default 256)")
    p.add_argument("--random-init", action="store_true", help="add the first checkpoint's architecture, untrained")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of torch (0: torch's default)")
    p.add_argument("--out", help="also write OUT/views.json and OUT/views.md")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        if a.images < 2:
            raise plumbing.BadInput("--images must be >= 2 (a spread across images)")
        res = measure(a.ckpts, a.data, a.images, a.random_init)
    except plumbing.BadInput as e:
        raise SystemExit(f"error: {e}") from None
    if a.out:
        save_results(a.out, "views", res, to_markdown)
    else:
        print(to_markdown(res))


if __name__ == "__main__":
    main()
