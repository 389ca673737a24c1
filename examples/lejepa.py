"""
examples/lejepa.py: a worked fork of radjepa.py, I-JEPA masking + SIGReg (LeJEPA, Balestriero & LeCun,
arXiv 2511.08544). It imports radjepa, swaps one function (radjepa.objective; with --no-ema also ema_update)
and runs radjepa.main unchanged.

  python examples/lejepa.py --data DIR --out OUT [--sigreg-lambda L] [--no-ema] [radjepa.py flags]
  python -m examples.lejepa ...   (from the repository root; --help lists radjepa.py's flags too)

Why collapse happens. The predictor regresses the target encoder's features. If both branches were trained by
that loss alone, the cheapest solution is for the encoder to output one constant for every image: the targets
are then perfectly predictable and the loss is 0, and the features say nothing.

Two ways to prevent it:
  I-JEPA (radjepa.py): make the constant hard to reach. The target is an EMA of the encoder and gets no
    gradient (stop-gradient), and a predictor sits between the branches (asymmetry): the encoder chases a
    slowly moving target instead of moving both ends of the loss toward each other. It works in practice; it
    is not a guarantee (radjepa's log watches std and erank for that reason).
  LeJEPA: make the constant expensive. SIGReg adds a term that is small only when the embeddings, projected on
    any direction, look like samples of N(0, 1) across the batch: an isotropic Gaussian. A constant (or any
    low-rank cloud) is far from that along most directions, so it is penalised whatever the predictor does;
    no EMA and no stop-gradient are then needed (LeJEPA's claim, which --no-ema tests).

The two variants here (loss = smooth-L1 + L * SIGReg):
  default      SIGReg added to I-JEPA: EMA target and stop-gradient kept (L = --sigreg-lambda, default 0.01).
  --no-ema     SIGReg instead of EMA + stop-gradient: the targets come from the encoder itself, with gradients
               through them; the EMA is skipped (the checkpoint's target_encoder is a copy of the encoder, so
               load_encoder, eval.py and the probes read the trained encoder). --sigreg-lambda 0 with --no-ema
               has nothing against collapse: that is the run that shows it. Default L: 1.
SIGReg is applied to each image's mean token ([B, D] per micro-batch) of every view that gets gradients, as
LeJEPA regularises every view. With the EMA target that is the context view alone (the target gets no gradient:
a regulariser on it would do nothing). With --no-ema the whole-image view, which makes the targets, has
gradients too, so SIGReg is the mean over both views. Regularising the context view alone leaves a shortcut,
and training finds it (BENCHMARKS.md section 17): the encoder tells a masked view from a whole one, keeps the
context view Gaussian (SIGReg 0.05) and maps every whole image to nearly one embedding (std 0.02 across images,
SIGReg 1.1), so the targets are constant, trivially predicted, and the probes read random-init levels.

What it measured (BENCHMARKS.md section 17: the experiment.sh cpu recipe on the version-2 phantoms, at the same CPU
time as I-JEPA, probed at 256 px). With the EMA target every weight (0.01, 0.1, 1) is below I-JEPA on every probe,
less so the smaller L: L = 0.01 (two seeds) reads linear / attentive AUROC 0.597 / 0.704 and Dice 0.798 against
I-JEPA's 0.669 / 0.787 / 0.813. Without it, L = 0.1 collapses completely (one embedding for every image), L = 1 in
dimension, in both seeds (effective rank 7.3, I-JEPA 68) and L = 10 spreads the features (rank 22) but they carry
less than random weights (linear 0.470, random init 0.551). On these phantoms SIGReg does not replace the EMA and
stop-gradient, and I-JEPA is ahead of every fork run on every probe.

What the fork changes: 13 lines of code for SIGReg (sigreg, 10; pooled, 3); objective(), radjepa.objective's
4 lines of code rewritten as 13 (the generator, the --no-ema targets with gradients, + lambda * SIGReg of
each view that has gradients);
copy_encoder (1), radjepa.ema_update at momentum 0 for --no-ema; the command line (~40 lines: fork_parser,
split_args, forked, main) parses the fork's flags, swaps objective (and ema_update) in for one run, sets
radjepa.OBJECTIVE, hands the rest to radjepa.main and restores all three after (so bench.ablate can train the fork
and the original in one process: its objective rows, `experiment.sh sigreg`). Nothing of
radjepa.train_step is copied: its token weighting, --accum, DDP and optimizer step run the fork unchanged.
Under torchrun, --no-ema is refused (untested: the DDP-wrapped encoder would run twice per backward). After
--resume the random directions restart from --seed (they are random anyway).
"""
import argparse
import os
import sys
from contextlib import contextmanager, nullcontext

import torch

if __package__ is None or __package__ == "":  # `python examples/lejepa.py`: radjepa.py is one folder up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import radjepa  # noqa: E402

FORK = dict(lam=1.0, no_ema=False, n_dirs=256, seed=0, gen=None)  # set by main(); gen: made on first use


def sigreg(z, n_dirs=256, n_knots=17, gen=None):
    """SIGReg (LeJEPA): how far the rows of z [N, D] are from an isotropic standard Gaussian. -> a scalar >= 0.

    z is projected on n_dirs random unit directions a (fresh from `gen` at every call). For each direction,
    x = z @ a is a 1-D sample of N values; if z ~ N(0, I), then x ~ N(0, 1) exactly, whatever a. The
    Epps-Pulley statistic compares its empirical characteristic function phi(t) = mean_j exp(i t x_j) with
    N(0, 1)'s, exp(-t^2/2), weighted by w(t) = exp(-t^2/2):
        EP = integral over t in [-5, 5] of |phi(t) - exp(-t^2/2)|^2 w(t) dt
    The integrand is even in t (phi(-t) is phi(t)'s conjugate), so it is integrated on [0, 5] by the trapezoid
    rule on n_knots knots and doubled. Nothing is standardised: a cloud of the wrong scale (std 3), a shifted
    one or a constant is penalised. Returns the mean of EP over the directions. Cost O(N D n_dirs + N n_dirs
    n_knots): linear in N and D (memory: the [N, n_dirs, n_knots] phases).

    Not multiplied by N (the paper's test statistic is N * EP). N * EP has a null distribution that does not
    depend on N: right for a hypothesis test. As a loss, EP itself estimates a fixed distance between
    distributions, so one lambda means the same at any batch size, --accum and number of processes. Values:
    a Gaussian sample scores about (1/N) * integral (1 - e^{-t^2}) e^{-t^2/2} dt = 1.06 / N (the ECF's
    variance); a constant at 0 scores 0.41 (and more elsewhere); N(0, 3^2) about 0.51."""
    N, D = z.shape
    a = torch.randn(D, n_dirs, generator=gen, device=gen.device if gen is not None else z.device)
    a = (a / a.norm(dim=0, keepdim=True)).to(z.device)  # [D, M] unit directions
    x = z.float() @ a  # [N, M]
    t = torch.linspace(0.0, 5.0, n_knots, device=z.device)  # [K]
    gauss = torch.exp(-0.5 * t * t)  # [K] N(0, 1)'s characteristic function, also the weight
    tx = x[..., None] * t  # [N, M, K]
    err = (tx.cos().mean(0) - gauss) ** 2 + tx.sin().mean(0) ** 2  # [M, K] |phi - exp(-t^2/2)|^2
    return 2 * torch.trapezoid(err * gauss, t, dim=-1).mean()


def pooled(ctx, b):
    """The encoder's packed context tokens [T_ctx, D] -> each image's mean context token [B, D]."""
    img = torch.repeat_interleave(torch.arange(len(b.ctx_len)), b.ctx_len).to(ctx.device)  # [T_ctx]
    s = ctx.float().new_zeros(len(b.ctx_len), ctx.shape[1]).index_add_(0, img, ctx.float())
    return s / b.ctx_len.to(ctx.device, torch.float32)[:, None]


def objective(enc, pred, target, b, target_blocks=1):
    """radjepa.objective, forked (same arguments, same (loss, targets) result): steps 1-3 of one
    micro-batch, + lambda * SIGReg of each image's mean context token; --no-ema: the targets are the
    encoder's own, with gradients. radjepa.train_step around it (weighting, --accum, DDP, the
    optimizer step) is unchanged."""
    online = getattr(enc, "module", enc)
    if FORK["gen"] is None:  # the directions' generator, on the device, the same on every process
        FORK["gen"] = torch.Generator(b.imgs.device).manual_seed(FORK["seed"])
    with nullcontext() if FORK["no_ema"] else torch.no_grad():  # --no-ema: no stop-gradient
        h = radjepa.target_features(online if FORK["no_ema"] else target, b.imgs, target_blocks)
    ctx = enc(b.imgs, b.ctx_idx, b.ctx_seqs)  # kept for SIGReg
    # --no-ema: the torch loss (the Triton one gives the targets no gradient and refuses one that needs it)
    loss = (radjepa.jepa_loss_torch if FORK["no_ema"] else radjepa.OPS["loss"])(pred(ctx, b), h, b.tgt_idx)
    if FORK["lam"]:
        reg = sigreg(pooled(ctx, b), FORK["n_dirs"], gen=FORK["gen"])  # the context view
        if FORK["no_ema"]:  # the whole-image view carries gradients too: regularise it as well, or it collapses
            reg = (reg + sigreg(h.float().mean(1), FORK["n_dirs"], gen=FORK["gen"])) / 2
        loss = loss + FORK["lam"] * reg
    return loss, h.detach()


def copy_encoder(target, online, m):
    """--no-ema's ema_update: the target is a copy of the encoder (momentum 0), so the checkpoint's
    target_encoder, which load_encoder, eval.py and the probes read, is the trained encoder."""
    EMA_UPDATE(target, online, 0.0)


EMA_UPDATE = radjepa.ema_update


FLAGS = ("--sigreg-lambda", "--no-ema", "--sigreg-dirs")  # the fork's own flags; the rest go to radjepa.py
LAMBDA = {False: 0.01, True: 1.0}  # --sigreg-lambda's default, by --no-ema: each variant's best measured weight


def fork_parser():
    p = argparse.ArgumentParser(add_help=False, prog="examples/lejepa.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--sigreg-lambda", type=float, default=None,
                   help=f"weight L of SIGReg in the loss (default {LAMBDA[False]:g} with the EMA target, "
                        f"{LAMBDA[True]:g} with --no-ema: each variant's best measured weight, BENCHMARKS.md "
                        "section 17)")
    p.add_argument("--no-ema", action="store_true", help="SIGReg instead of the EMA target and stop-gradient")
    p.add_argument("--sigreg-dirs", type=int, default=256, help="random directions per SIGReg call (default 256)")
    return p


def uses_fork(argv):
    """True when argv names one of the fork's flags (bench.ablate routes such a row through forked())."""
    return any(a.split("=", 1)[0] in FLAGS for a in argv)


def split_args(argv):
    """argv -> (the fork's settings, radjepa.py's flags); a bad fork value is a one-line SystemExit."""
    args, rest = fork_parser().parse_known_args(argv)
    if args.sigreg_lambda is None:
        args.sigreg_lambda = LAMBDA[args.no_ema]
    if args.sigreg_lambda < 0 or args.sigreg_dirs < 1:
        raise SystemExit("error: --sigreg-lambda must be >= 0 and --sigreg-dirs >= 1")
    if args.no_ema and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise SystemExit("error: --no-ema runs the encoder twice per step, which DDP does not allow: one process")
    return args, rest


@contextmanager
def forked(args, seed=0):
    """Inside: radjepa.objective (and, --no-ema, ema_update) swapped for the fork's, and radjepa.OBJECTIVE (which
    config.json, the log and loss.png show) names it. On exit all is restored, so one process can train the
    original and forks one after the other (bench.ablate's objective rows)."""
    saved = radjepa.objective, radjepa.ema_update, radjepa.OBJECTIVE, dict(FORK)
    FORK.update(lam=args.sigreg_lambda, no_ema=args.no_ema, n_dirs=args.sigreg_dirs, gen=None, seed=seed)
    radjepa.objective = objective
    if args.no_ema:
        radjepa.ema_update = copy_encoder
    radjepa.OBJECTIVE = (f"fork: smooth-L1 + {args.sigreg_lambda:g}*sigreg, "
                         f"{'no EMA/stop-grad' if args.no_ema else 'EMA target'} (examples/lejepa.py)")
    try:
        yield
    finally:
        radjepa.objective, radjepa.ema_update, radjepa.OBJECTIVE = saved[:3]
        FORK.clear()
        FORK.update(saved[3])


def main(argv=None):
    """Parse the fork's flags, then radjepa.main(the rest) inside forked()."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        fork_parser().print_help()
        print("\nThe flags of radjepa.py follow.\n")
    args, rest = split_args(argv)
    if args.no_ema and not args.sigreg_lambda:
        print("warning: --no-ema with --sigreg-lambda 0: nothing prevents collapse", file=sys.stderr)
    with forked(args, seed=radjepa.parse_args(rest).get("seed", 0)):
        return radjepa.main(rest)


if __name__ == "__main__":
    main()
