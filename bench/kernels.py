"""
kernels/bench.py's measurement, written to a folder: the Triton kernels' correctness at I-JEPA lengths
and their speed against FA2 varlen, padded SDPA and truncation (what is measured: kernels/bench.py).

    python -m bench.kernels --out DIR           # GPU -> DIR/kernels_bench.json, DIR/kernels_bench.md
    python -m bench.kernels --smoke --out DIR   # CPU, Triton interpreter, tiny sizes (~10 s); timings
                                                # meaningless
kernels/ measures and prints only (it imports nothing of the project); the files are written here.
"""
import sys

from bench import out_folder, save_results
from kernels import bench as kernels_bench


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = kernels_bench.parser("python -m bench.kernels")
    p.add_argument("--out", required=True, help="folder for kernels_bench.json and kernels_bench.md")
    args = kernels_bench.settle(p, p.parse_args(argv))
    out_folder(args.out)  # before the measurement, not after it
    result = kernels_bench.run(args, "python -m bench.kernels " + " ".join(argv))
    save_results(args.out, "kernels_bench", result, kernels_bench.to_markdown)
    return result


if __name__ == "__main__":
    main()
