"""
Several runs' training curves on one picture: a fork beside the original, one seed beside another.

    python -m bench.curves RUN [RUN ...] --out curves.png [--labels A B ...]

RUN is a run folder (its log.jsonl) or a log.jsonl. Each run gets its own colour and a legend line; the panels are
radjepa.py's loss.png panels (the loss, the two collapse indicators, the online probe) for every run at once, the step
on x. A run's label is --labels' entry, else its folder as given. The loss panel is only comparable between runs of
one objective (a fork adds its own terms: its log header's "objective" says which); the indicators and the probe are
comparable across objectives.
"""
import argparse
import os
import sys

if __package__ in (None, ""):  # `python bench/curves.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import plumbing  # noqa: E402
import radjepa  # noqa: E402


def log_of(run):
    path = os.path.join(run, "log.jsonl") if os.path.isdir(run) else run
    if not plumbing.read_log(path):
        raise plumbing.BadInput(f"{run}: no log.jsonl with training records there")
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (or their log.jsonl), up to 10")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--labels", nargs="+", help="one legend label per run (default: the run's folder)")
    a = p.parse_args(argv)
    try:
        if len(a.runs) > len(plumbing.RUN_COLOURS):
            raise plumbing.BadInput(f"{len(a.runs)} runs: at most {len(plumbing.RUN_COLOURS)} fit one picture")
        if a.labels and len(a.labels) != len(a.runs):
            raise plumbing.BadInput(f"--labels: {len(a.labels)} given for {len(a.runs)} runs")
        labels = a.labels or [r.rstrip("/") for r in a.runs]
        logs = [(label, log_of(r)) for label, r in zip(labels, a.runs)]
        plumbing.plot_log(logs, a.out, [("loss", "loss (per objective)"), *radjepa.CURVES])
    except plumbing.BadInput as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {a.out}: {len(logs)} runs")


if __name__ == "__main__":
    main()
