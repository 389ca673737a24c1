"""
bench/: the measurement room. What measures RadJEPA (speed, the official code beside it, the GPU check, the
ablations) lives here, apart from the product: radjepa.py, eval.py, data_prep.py and kernels/ never import it.
Clone-only (not installed); run each file from the repository root:

  kernels.py         python -m bench.kernels --out DIR       the Triton kernels' micro-benchmark
                                                             (kernels/bench.py) -> DIR/kernels_bench.{json,md}
  train_bench.py     python -m bench.train_bench --out DIR   whole training steps: torch/triton x compile,
                                                             truncation, the official code; MFU
  official_ijepa.py  python -m bench.official_ijepa          the official I-JEPA train step, run unmodified
                                                             from third_party/ijepa
  gpu_check.py       python -m bench.gpu_check --out DIR     the one GPU call: kernels + loss curves
                                                             triton/compile vs torch + train_bench
  aot_check.py       python -m bench.aot_check [--quick]     compile the attention kernels for sm_90 without
                                                             a GPU: registers, spills, shared memory
  ablate.py          python -m bench.ablate OUT -- RECIPE    the ablation table: one factor of the recipe
                                                             changed per row, probed by eval.py
  cost.py            python -m bench.cost --out DIR          FLOPs, GPU-hours on 1/8/64 H100s and memory by
                                                             micro-batch and --accum (--measure: on this CPU)
  probe_agreement.py python -m bench.probe_agreement OUT ...  does the online probe (--probe-every) rank a run's
                                                             checkpoints like eval.py's probes? Spearman's rho
  curves.py          python -m bench.curves RUN... --out PNG  several runs' training curves on one picture: a
                                                             fork beside the original (loss.png's panels)
  views.py           python -m bench.views CKPT... --data DIR  has a view collapsed? each image's mean token per
                                                             view (context, whole image): std, SIGReg

Each takes --smoke (or a tiny configuration) that runs on a CPU; its timings mean nothing. This file holds
what several of them need: the --out check and the result writer.
"""
import os

import plumbing


def out_folder(out, flag="--out"):
    """Before any work: `out` as a folder (created if missing) -> its absolute path. A file, a path under
    a file or an unwritable place -> SystemExit, one line naming the flag and the OS reason."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: {flag} {out}: cannot make it a folder ({plumbing.os_reason(e)})") from None
    return os.path.abspath(out)


def save_results(out, stem, result, to_markdown):
    """OUT/<stem>.json and OUT/<stem>.md, each written atomically; the markdown is printed too
    (bench.kernels, bench.train_bench). A failed write (a full disk) is one line: the file, the OS reason."""
    out = out_folder(out)
    md = to_markdown(result)
    try:
        plumbing.write_json(os.path.join(out, f"{stem}.json"), result)
        plumbing.write_text(os.path.join(out, f"{stem}.md"), md)
    except plumbing.BadInput as e:
        raise SystemExit(f"error: {e}") from None
    print(md)
