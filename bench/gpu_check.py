"""
The GPU check: everything a session with one GPU should run, in ONE call of at most ~9 minutes, into one flat folder.

    python3 -m bench.gpu_check --out "$OUT"           # on the GPU machine (H200); ~8 minutes
    python -m bench.gpu_check --smoke --out /tmp/gc   # CPU: tiny sizes, Triton interpreter; proves the
                                                      # plumbing

Parts, each in its own process with a timeout, progress printed as it goes (the whole run stops starting new work
when --budget seconds are spent):
  1. kernels      `python -m bench.kernels`: the Triton kernels' correctness at I-JEPA lengths and their speed
                  against FA2 varlen, padded SDPA and truncation            -> kernels_bench.json, kernels_bench.md
  2. loss curves  synthetic phantoms (data_prep.py), then radjepa.py for --loss-steps steps twice from the same seed:
                  --kernels torch, and the candidate path (--kernels triton --compile). Passes when both losses fall
                  (mean of the last 10 logged steps < 0.8 x the first 5) and the candidate's curve follows the torch
                  path's within bf16 noise: step-1 loss within 2%, mean relative gap over all steps <= 5%, last-10
                  means within 5%                                            -> loss_check.json
  3. end to end   `python -m bench.train_bench` with the time left: whole training steps, every path,
                  ViT-B/16 at batch 128 and 256, ViT-B/14, official I-JEPA code (if third_party/ijepa exists)
                                                                             -> train_bench.json, train_bench.md
Also written: gpu_check.md (summary of all parts) and gpu_check.log (everything printed). 7 files, no sub-folders.
Nothing here aborts on a failed part: a failure is recorded and the next part runs. The last line names every
failure (a part not ok, a kernel case not correct, a train_bench row not ok); with --strict (CI) any failure makes
the exit status 1, else it is 0 whenever the check itself ran.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

import plumbing
from bench import out_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# radjepa.py flags of the loss-curve check. GPU: a ViT-S/16 at 160 px (10x10 patches), batch 64; head dims 64 and 32.
# The online probe is off: the check compares the kernels' loss curves, and its time is the kernels'.
LOSS_RUN = ["--model", "vit_small", "--patch", "16", "--img-size", "160", "--batch-size", "64", "--warmup", "10",
            "--lr", "1e-3", "--workers", "8", "--log-every", "1", "--ckpt-every", "100000", "--probe-every", "0"]
LOSS_RUN_SMOKE = ["--model", "vit_tiny", "--width", "64", "--heads", "2", "--depth", "2", "--pred-width", "64",
                  "--pred-depth", "1", "--patch", "16", "--img-size", "64", "--batch-size", "4", "--warmup", "2",
                  "--lr", "2e-3", "--workers", "0", "--log-every", "1", "--min-ctx", "4", "--ckpt-every", "100000",
                  "--probe-every", "0"]


class Log:
    """Print and keep everything; the file copy is capped (only what fits comes back from the GPU machine)."""

    def __init__(self, path, cap=400_000):
        self.path, self.cap, self.parts = path, cap, []

    def __call__(self, msg, echo=True):
        if echo:  # echo=False: already printed as it streamed
            print(msg, flush=True)
        self.parts.append(msg)
        self.flush()

    def flush(self):
        text = "\n".join(self.parts)
        if len(text) > self.cap:
            text = text[:self.cap // 4] + "\n[... cut ...]\n" + text[-3 * self.cap // 4:]
        plumbing.write_text(self.path, text + "\n")


def run_part(name, cmd, timeout, log, cwd=ROOT, env=None):
    """Run cmd, streaming its output; -> dict(status ok|failed|timeout, seconds, rc, tail)."""
    log(f"\n== {name}: {' '.join(cmd)}  (timeout {timeout:.0f} s)")
    t0, lines = time.time(), []
    if timeout < 5:
        log(f"   skipped: only {timeout:.0f} s of the budget left")
        return dict(status="skipped", seconds=0.0, rc=None, tail="budget spent")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    timed_out, buf = False, b""
    try:
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            if time.time() - t0 > timeout:
                timed_out = True
                proc.kill()
                break
            if not sel.select(timeout=1.0):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)  # never blocks on a line without its newline (tqdm)
            if not chunk:
                break
            *done, buf = (buf + chunk).split(b"\n")
            for raw in done:
                line = raw.decode(errors="replace").split("\r")[-1]  # tqdm redraws: keep the last state
                lines.append(line)
                print("   " + line, flush=True)
    finally:
        rc = proc.wait()
        if buf:
            lines.append(buf.decode(errors="replace").split("\r")[-1])
    dt = time.time() - t0
    status = "timeout" if timed_out else "ok" if rc == 0 else "failed"
    tail = "\n".join(lines[-40:])
    log("\n".join("   " + x for x in lines[-200:]) if lines else "   (no output)", echo=False)
    log(f"== {name}: {status} in {dt:.0f} s (rc {rc})")
    return dict(status=status, seconds=dt, rc=rc, tail=tail)


def losses(log_jsonl):
    if not os.path.exists(log_jsonl):
        return []
    return [r["loss"] for r in map(json.loads, open(log_jsonl)) if "loss" in r]


def compare_curves(ref, cand):
    """The verdict of part 2 (criteria in the module docstring) from two per-step loss lists. Runs shorter than 20
    steps (smoke) compare the first quarter with the last half."""
    import statistics
    n = min(len(ref), len(cand))
    n_first, n_last = (5, 10) if n >= 20 else (max(1, n // 4), max(1, n // 2))
    out = dict(steps_compared=n, ref_steps=len(ref), cand_steps=len(cand))
    if n < 3 or len(ref) != len(cand):
        out.update(passed=False, reason=f"too few steps logged ({len(ref)} torch, {len(cand)} candidate)")
        return out
    rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(ref[:n], cand[:n])]
    first = [statistics.mean(x[:n_first]) for x in (ref, cand)]
    last = [statistics.mean(x[n - n_last:n]) for x in (ref, cand)]
    out.update(step1_rel_gap=rel[0], mean_rel_gap=statistics.mean(rel), max_rel_gap=max(rel),
               first_mean=first, last_mean=last, last_rel_gap=abs(last[1] - last[0]) / max(abs(last[0]), 1e-12),
               falls=[last[i] < 0.8 * first[i] for i in range(2)])
    checks = dict(both_fall=all(out["falls"]), step1=rel[0] <= 0.02, mean_gap=out["mean_rel_gap"] <= 0.05,
                  last=out["last_rel_gap"] <= 0.05)
    out.update(checks=checks, passed=all(checks.values()))
    return out


def loss_check(args, log, deadline, tmp):
    """Part 2. -> result dict (also the curves)."""
    py = sys.executable
    data = os.path.join(tmp, "phantoms")
    n, size = (64, 64) if args.smoke else (512, 160)
    prep = run_part("loss check: phantoms", [py, "data_prep.py", "synthetic", data, "--n", str(n), "--size",
                                             str(size), "--seed", "0", "--workers", str(min(16, os.cpu_count() or 1))],
                    min(120, deadline - time.time()), log)
    res = dict(prep=prep["status"], runs={})
    if prep["status"] != "ok":
        res.update(passed=False, reason="phantom preparation failed")
        return res
    common = ["--data", data, "--steps", str(args.loss_steps), "--seed", "0"] + (
        LOSS_RUN_SMOKE if args.smoke else LOSS_RUN)
    curves = {}
    for name, flags in (("torch", ["--kernels", "torch"]), ("candidate", args.candidate.split())):
        out = os.path.join(tmp, name)
        left = deadline - time.time() - (60 if name == "torch" else 0)  # keep room for the candidate
        r = run_part(f"loss check: {name} ({' '.join(flags)})",
                     [py, "radjepa.py", "--out", out] + common + flags, min(args.loss_timeout, left), log)
        curves[name] = losses(os.path.join(out, "log.jsonl"))
        res["runs"][name] = dict(flags=flags, status=r["status"], seconds=r["seconds"], losses=curves[name],
                                 tail=r["tail"][-1500:] if r["status"] != "ok" else "")
    res.update(compare_curves(curves["torch"], curves["candidate"]))
    log(f"loss check: {'PASSED' if res['passed'] else 'FAILED'} "
        + json.dumps({k: res[k] for k in ("step1_rel_gap", "mean_rel_gap", "last_rel_gap", "checks", "reason")
                      if k in res}))
    return res


def failures(s):
    """Every failure of a run of the check, one short phrase each ([] = all passed): a part whose status is not
    ok/passed, an attention case of kernels_bench.json that is not correct, a train_bench row that is not ok. (The
    gather's bit-equality is not one: the CPU interpreter rounds bf16 toward zero, 1 ulp.)"""
    bad = [f"{name}: {p['status']}" for name, p in s["parts"].items() if p["status"] not in ("ok", "passed")]
    out = s["out"]
    if s["parts"].get("kernels", {}).get("status") == "ok":
        try:
            kb = json.load(open(os.path.join(out, "kernels_bench.json")))
            bad += [f"kernels: attention head dim {c['head_dim']} not correct" for c in kb["attention"]["cases"]
                    if not c["correct"]]
        except (OSError, ValueError, KeyError) as e:
            bad.append(f"kernels: kernels_bench.json unreadable ({type(e).__name__})")
    if s["parts"].get("end to end", {}).get("status") == "ok":
        try:
            rows = json.load(open(os.path.join(out, "train_bench.json")))["rows"]
            bad += [f"end to end: {r['config']} {r['path']} {r['status']}" for r in rows if r["status"] != "ok"]
        except (OSError, ValueError, KeyError) as e:
            bad.append(f"end to end: train_bench.json unreadable ({type(e).__name__})")
    return bad


def summary_md(s):
    lines = [f"# GPU check, {s['date']}", "", f"machine: {s['machine']} | torch {s['torch']} | mode: {s['mode']}",
             f"command: `{s['command']}` | total {s['seconds']:.0f} s", "", "| part | status | seconds |",
             "|---|---|---:|"]
    for name, p in s["parts"].items():
        lines.append(f"| {name} | {p['status']} | {p.get('seconds', 0):.0f} |")
    lines += ["", "failures: " + ("; ".join(s["failures"]) if s.get("failures") else "none")]
    lc = s.get("loss_check")
    if lc:
        lines += ["", f"## Loss curves: torch vs `{' '.join(lc['runs'].get('candidate', {}).get('flags', []))}`: "
                      f"{'PASSED' if lc.get('passed') else 'FAILED'}", ""]
        if "checks" in lc:
            lines += [f"step-1 gap {100 * lc['step1_rel_gap']:.2f}% | mean gap {100 * lc['mean_rel_gap']:.2f}% | max "
                      f"gap {100 * lc['max_rel_gap']:.2f}% | last-10 gap {100 * lc['last_rel_gap']:.2f}% | first-5 -> "
                      f"last-10 mean: torch {lc['first_mean'][0]:.4f} -> {lc['last_mean'][0]:.4f}, candidate "
                      f"{lc['first_mean'][1]:.4f} -> {lc['last_mean'][1]:.4f} | checks {lc['checks']}", "",
                      "| step | torch | candidate |", "|---:|---:|---:|"]
            t, c = lc["runs"]["torch"]["losses"], lc["runs"]["candidate"]["losses"]
            for i in sorted(set(list(range(0, min(len(t), len(c)), 5)) + [min(len(t), len(c)) - 1])):
                lines.append(f"| {i + 1} | {t[i]:.5f} | {c[i]:.5f} |")
        else:
            lines.append(lc.get("reason", ""))
        for name, r in lc.get("runs", {}).items():
            if r["status"] != "ok":
                lines += ["", f"{name} run {r['status']}:", "```", r["tail"], "```"]
    for name, f in (("kernels", "kernels_bench.md"), ("end to end", "train_bench.md")):
        path = os.path.join(s["out"], f)
        lines += ["", f"## {name}: see {f}" if os.path.exists(path) else f"## {name}: no report ({f} missing)"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (flat: at most 7 files)")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny sizes everywhere (Triton interpreter)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole check (default 480; smoke 900)")
    p.add_argument("--kernels-timeout", type=float, default=150, help="seconds for part 1")
    p.add_argument("--loss-steps", type=int, default=None, help="steps per loss-curve run (default 50; smoke 15)")
    p.add_argument("--loss-timeout", type=float, default=170, help="seconds per loss-curve run")
    p.add_argument("--candidate", default=None,
                   help="radjepa.py flags of the path checked against --kernels torch (default '--kernels triton "
                        "--compile'; smoke '--kernels triton')")
    p.add_argument("--train-bench-args", default="",
                   help="extra arguments for bench.train_bench (e.g. '--paths torch triton')")
    p.add_argument("--skip", nargs="*", default=[], choices=["kernels", "loss", "train"], help="parts to leave out")
    p.add_argument("--strict", action="store_true",
                   help="exit status 1 if anything failed (a part, a kernel case, a train_bench row); for CI")
    args = p.parse_args(argv)
    args.budget = args.budget or (900 if args.smoke else 480)
    args.loss_steps = args.loss_steps or (15 if args.smoke else 50)
    args.candidate = args.candidate or ("--kernels triton" if args.smoke else "--kernels triton --compile")
    if args.smoke and not args.train_bench_args:  # the interpreted/compiled rows take minutes on CPU; the official
        official = os.path.exists(os.path.join(ROOT, "third_party", "ijepa", "src", "train.py"))  # code if cloned
        args.train_bench_args = "--paths torch truncate" + (" official" if official else "")
    t0 = time.time()
    deadline = t0 + args.budget
    out = out_folder(args.out)  # a file, or a path under one: one line, before any work
    log = Log(os.path.join(out, "gpu_check.log"))
    import torch
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("error: no CUDA device here; on CPU run "
                         "`python -m bench.gpu_check --smoke --out DIR`")
    py = sys.executable
    os.environ["PYTHONUNBUFFERED"] = "1"
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # smoke: every triton path runs in the interpreter
    env = dict(os.environ)
    s = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), out=out,
             machine=torch.cuda.get_device_name() if cuda else "CPU (smoke)", torch=torch.__version__,
             mode="smoke" if args.smoke else "full", command="python -m bench.gpu_check " + " ".join(argv),
             parts={})
    log(f"gpu_check: {s['machine']}, torch {torch.__version__}, budget {args.budget:.0f} s, out {out}")
    if cuda:
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            log(f"nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}")
        except (OSError, subprocess.SubprocessError) as e:
            log(f"nvidia-smi: not available ({e})")
    tmp = tempfile.mkdtemp(prefix="gpu_check_")
    try:
        if "kernels" not in args.skip:
            cmd = [py, "-m", "bench.kernels", "--out", out] + (["--smoke"] if args.smoke else [])
            s["parts"]["kernels"] = run_part("kernels (python -m bench.kernels)", cmd,
                                             min(args.kernels_timeout, deadline - time.time()), log, env=env)
        if "loss" not in args.skip:
            t1 = time.time()
            s["loss_check"] = loss_check(args, log, deadline - (0 if "train" in args.skip else 90), tmp)
            s["parts"]["loss curves"] = dict(status="passed" if s["loss_check"].get("passed") else "failed",
                                             seconds=time.time() - t1)
            plumbing.write_json(os.path.join(out, "loss_check.json"), s["loss_check"])
        if "train" not in args.skip:
            left = deadline - time.time() - 10
            cmd = [py, "-m", "bench.train_bench", "--out", out, "--budget", f"{max(left - 30, 1):.0f}"]
            cmd += (["--smoke"] if args.smoke else []) + args.train_bench_args.split()
            s["parts"]["end to end"] = run_part("end to end (python -m bench.train_bench)", cmd, left, log,
                                                env=env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        s["seconds"] = time.time() - t0
        s["failures"] = failures(s)
        plumbing.write_text(os.path.join(out, "gpu_check.md"), summary_md(s))
        log(f"\ngpu_check done in {s['seconds']:.0f} s: " + ", ".join(f"{k} {v['status']}"
                                                                      for k, v in s["parts"].items()))
        log(f"files in {out}: {sorted(os.listdir(out))}")
        log("failures: " + ("; ".join(s["failures"]) if s["failures"] else "none"))
    if args.strict and s["failures"]:
        raise SystemExit(f"error: gpu_check --strict: {len(s['failures'])} failure(s): " + "; ".join(s["failures"]))
    return s


if __name__ == "__main__":
    try:
        main()
    except plumbing.BadInput as e:  # a failed write (a full disk): one line, the file and the OS reason
        raise SystemExit(f"error: {e}") from None
