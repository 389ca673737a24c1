"""The ablation harness (python -m bench.ablate, experiment.sh ablate): a tiny 2-row x 2-seed table end to end, the
table's numbers recomputed from the stored test scores, resume (finished runs are skipped, a killed run continues),
and rows whose flags are refused before they are recorded."""
import fcntl
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import eval as E
import radjepa
from bench import ablate as A

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = ["--model", "vit_tiny", "--width", "32", "--heads", "2", "--depth", "2", "--pred-width", "16",
          "--pred-depth", "1", "--patch", "16", "--img-size", "64", "--min-ctx", "2", "--batch-size", "8",
          "--workers", "0", "--steps", "10"]    # the recipe's length: the harness's 2-step runs compress it 5x


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)                      # tiny work on shared cores: extra threads only add overhead
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate")
    subprocess.run([sys.executable, os.path.join(REPO, "data_prep.py"), "synthetic", str(root / "data"), "--n", "40",
                    "--size", "64", "--seed", "0", "--workers", "1"], check=True, capture_output=True, timeout=120)
    return root


def _argv(root, *extra):
    return [str(root / "abl"), "--data", str(root / "data"), "--steps", "2", "--rows", "n_targets=2",
            "--probe-sizes", "64", "128", "--epochs", "1", "--seg-epochs", "1", "--n-boot", "30", "--mask-size", "32",
            *extra, "--", *RECIPE]


def test_ablation_table_end_to_end_and_resume(tiny, capsys):
    root = tiny
    a = A.ablate_args(_argv(root))
    assert a.rows == ["baseline", "n_targets=2"] and a.seeds == [0, 1]
    # a run killed mid-pretraining: step 1 of 2 on disk, no result. The harness must continue it, not restart it.
    radjepa.main(A.ablation_train_argv(a, "n_targets=2", 1) + ["--stop-at", "1"])
    assert A.main(_argv(root)) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 1" in out
    runs = root / "abl" / "s2"
    for rid in ("baseline", "n_targets=2"):
        for seed in (0, 1):
            assert radjepa.read_checkpoint(runs / rid / f"seed{seed}" / "ckpt.pt")["step"] == 2
    log = [json.loads(x) for x in open(runs / "n_targets=2" / "seed1" / "log.jsonl")]
    assert [r["start_step"] for r in log if "start_step" in r] == [0, 1]    # one start, one resume
    # its pretraining time counts both segments: each one step of the batch at that segment's img/s
    res = json.loads((runs / "n_targets=2" / "seed1" / "result.json").read_text())
    batch = log[0]["config"]["batch_size"]
    seconds = sum(batch / r["img_per_s"] for r in log if "loss" in r)
    assert res["pretrain_seconds"] == round(seconds, 1) and seconds > 0  # 2 tiny steps can round to 0.0 s
    c = radjepa.read_checkpoint(runs / "n_targets=2" / "seed0" / "ckpt.pt")["config"]
    assert c["n_targets"] == 2 and c["steps"] == 2 and c["warmup"] == 1
    # EMA compressed to the run length: 1 - 0.996 scaled by 10 / 2 steps; the end point 1.0 stays
    assert c["ema"] == pytest.approx(0.98) and c["final_ema"] == 1.0
    base = root / "abl" / "baselines"
    assert sorted(os.listdir(base)) == ["pixels_p16", "random_p16_w32_d2_h2_i64"]

    t = json.loads((root / "abl" / "ablation_s2.json").read_text())
    md = (root / "abl" / "ablation_s2.md").read_text()
    assert "## Probed at 64 px" in md and "## Probed at 128 px" in md and "| n_targets=2 |" in md
    assert "*random_p16_w32_d2_h2_i64*" in md and "*pixels_p16*" in md
    data = E.read_prepared(str(root / "data"), "all")
    test_rows = np.flatnonzero(data["split"] == "test")
    for size in ("64", "128"):
        rows = t["rows"][size]
        assert list(rows) == ["baseline", "n_targets=2"]
        for rid, row in rows.items():
            assert row["seeds"] == [0, 1]
            m = row["metrics"]
            for key in ("linear/auroc", "grid/auroc", "attentive/auroc", "dice", "linear/auprc", "erank"):
                assert len(m[key]["per_seed"]) == 2
                assert m[key]["mean"] == pytest.approx(np.mean(m[key]["per_seed"]))    # a row = mean of its seeds
            assert ("vs_baseline" in m["grid/auroc"]) == (rid != "baseline")
            assert {"vs_r", "vs_px"} <= set(m["grid/auroc"])
            assert set(row["targets"]) >= {"linear > random", "attentive > random", "dice > random",
                                           "erank >= random", "AUPRC > best pixel probe"}
            # the table's per-seed number is the macro AUROC of that run's stored test scores, recomputed here
            for seed in (0, 1):
                res = json.loads((runs / rid / f"seed{seed}" / "result.json").read_text())
                s = np.array(res["sizes"][size]["cls"]["linear"]["scores"])
                y = data["labels"][test_rows]
                want = np.mean([a_ for a_ in (E.auroc(y[:, j][np.isfinite(y[:, j])], s[:, j][np.isfinite(y[:, j])])
                                              for j in range(y.shape[1])) if a_ is not None])
                assert m["linear/auroc"]["per_seed"][seed] == pytest.approx(want, abs=1e-6)
                assert 1 <= res["sizes"][size]["geometry"]["erank"] <= 32
        # the baseline's difference to random init is its mean minus the random twin's score
        b = rows["baseline"]["metrics"]["grid/auroc"]
        rnd = t["baselines"][size]["random_p16_w32_d2_h2_i64"]["grid/auroc"]["mean"]
        assert b["vs_r"]["diff"] == pytest.approx(b["mean"] - rnd)
        d = rows["n_targets=2"]["metrics"]["dice"]
        assert d["vs_baseline"]["diff"] == pytest.approx(d["mean"] - rows["baseline"]["metrics"]["dice"]["mean"])

    # resume: nothing finished is rerun (no training, no probing); results and checkpoints are untouched
    stamp = {p: p.stat().st_mtime_ns for p in (root / "abl").rglob("*") if p.suffix in (".json", ".pt")
             and "ablation_" not in p.name}
    assert A.main(_argv(root)) == 0
    out = capsys.readouterr().out
    assert "=== " not in out and "RadJEPA |" not in out
    assert stamp == {p: p.stat().st_mtime_ns for p in stamp}
    # a lost result (e.g. killed while probing) is re-probed from the finished checkpoint, without retraining
    (runs / "baseline" / "seed1" / "result.json").unlink()
    assert A.main(_argv(root)) == 0
    out = capsys.readouterr().out
    assert "=== ablation row baseline" in out and "RadJEPA |" not in out
    assert (runs / "baseline" / "seed1" / "result.json").is_file()

    # a changed recipe is never mixed into a table of the old one
    argv = _argv(root)
    assert A.main(argv[:-len(RECIPE)] + [x if x != "16" or i != RECIPE.index("--pred-width") + 1 else "32"
                                         for i, x in enumerate(RECIPE)]) == 2
    assert "was trained with other pred_width than this call asks for" in capsys.readouterr().err

    # ranking stability between run lengths: the same three rows "run" at 2 and at 5 steps (copies of the same
    # results) must rank identically, Spearman +1; --table-only trains nothing
    import shutil
    shutil.copytree(runs / "baseline", runs / "lr=3e-3")
    for f in (runs / "lr=3e-3").glob("seed*/result.json"):
        f.write_text(json.dumps({**json.loads(f.read_text()), "row": "lr=3e-3"}))
    shutil.copytree(runs, root / "abl" / "s5")
    assert A.main([str(root / "abl"), "--data", str(root / "data"), "--steps", "5", "--table-only",
                   "--probe-sizes", "64", "128", "--n-boot", "30", "--", *RECIPE]) == 0
    md5 = (root / "abl" / "ablation_s5.md").read_text()
    assert "| erank | Spearman +1.00 over 3 rows |" in md5 and "RadJEPA |" not in capsys.readouterr().out


def test_ablation_bad_inputs_are_one_line_errors(tiny, tmp_path, capsys):
    root = tiny
    assert A.main([str(tmp_path / "o"), "--data", str(root / "data"), "--rows", "nope", "--", *RECIPE]) == 2
    assert "unknown ablation row(s) nope" in capsys.readouterr().err
    # a row whose flags the recipe cannot take (4 target blocks of a 2-block encoder): found before anything trains
    assert A.main([str(tmp_path / "o"), "--data", str(root / "data"), "--rows", "target=last4",
                   "--", *RECIPE]) == 2
    cap = capsys.readouterr()
    assert cap.err.strip() == "error: row target=last4: --target-blocks must be between 1 and --depth 2, not 4"
    assert "RadJEPA |" not in cap.out and not (tmp_path / "o" / "s200" / "baseline").exists()
    # two harnesses on one folder would train into the same checkpoints (the lock is plumbing.lock_file's flock)
    (tmp_path / "o2").mkdir()
    with open(tmp_path / "o2" / "s3.lock", "w") as holder:                 # a live harness holds it
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("4242\n"), holder.flush()
        assert A.main([str(tmp_path / "o2"), "--data", str(root / "data"), "--steps", "3", "--", *RECIPE]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'o2'} (python -m bench.ablate --steps 3) is in use by " \
                                      f"another process (pid 4242); wait for it or stop it\n"


def test_train_seconds_sums_every_segment_from_the_log():
    """pretrain_seconds comes from log.jsonl, not the harness's clock: right for a resumed run and for one that
    another process trained (the harness then only probes it). Hand numbers: batch 64; steps 0-20 at 64 img/s
    (logged at 10 and 20: 10 s each), a resume from the checkpoint at step 20, steps 20-30 at 32 img/s (20 s)."""
    head = lambda start: dict(type="header", start_step=start, config=dict(batch_size=64))  # noqa: E731
    rec = lambda step, ips: dict(type="train", step=step, loss=0.1, img_per_s=ips)          # noqa: E731
    probe = dict(type="probe", step=20, auroc=0.6, seconds=99.0)                             # not training time
    assert A.train_seconds([head(0), rec(10, 64), rec(20, 64), probe, head(20), rec(30, 32)]) == pytest.approx(40)
    assert A.train_seconds([]) == 0


def test_rows_add_the_baseline_unless_told_not_to():
    assert A.ablate_args(["x", "--rows", "lr=1e-3"]).rows == ["baseline", "lr=1e-3"]
    assert A.ablate_args(["x", "--rows", "lr=1e-3", "ema=0.999-1", "--no-baseline"]).rows == ["lr=1e-3", "ema=0.999-1"]
    names = [r[0] for r in A.ABLATION_ROWS]
    assert len(names) == len(set(names)) and "precision=fp32" in names
    recipe = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiment.sh")).read()
    assert "--lr 3e-4" in recipe  # the adopted CPU recipe (BENCHMARKS.md §10); the lr rows bracket it
    assert 'POOL=10000' in recipe and '-- --data "$PRE"' in recipe  # §11: pretraining on the unlabeled pool
    cpu = recipe[recipe.index("  cpu|cpu-long|ablate|sigreg)"):recipe.index("  gpu)")]
    assert "STEPS=4000" in cpu and '[ "$MODE" = ablate ] && STEPS=1000' in cpu  # §11's length; ablate's base (§10)
    assert '--steps "$STEPS" --warmup $((STEPS / 10))' in cpu


def test_a_recipe_data_folder_is_the_pretraining_set_and_the_probes_keep_theirs(tmp_path):
    """experiment.sh ablate passes `-- --data POOL ...`: every row pretrains on the pool (and a row's own --data, e.g.
    --add-row pool '--data P2', wins over both), while the probes stay on ablate's --data."""
    out = str(tmp_path / "o")
    a = A.ablate_args([out, "--data", "labeled", "--add-row", "other", "--data p2", "--", "--data", "pool", *RECIPE])
    assert a.data == "labeled"
    for rid, want in (("baseline", "pool"), ("other", "p2")):
        assert radjepa.make_config(radjepa.parse_args(A.ablation_train_argv(a, rid, 0))).data == want


def test_added_rows_are_recorded_and_trained_with_their_flags(tmp_path, capsys):
    """--add-row ID FLAGS: a combination row. It is remembered in OUT/rows.json (a later call, or --table-only, knows
    it without repeating it), its flags go to radjepa.py after the recipe's, and a clash is a one-line error."""
    out = str(tmp_path / "o")
    a = A.ablate_args([out, "--add-row", "combo", "--pred-depth 2 --ema 0.999", "--", *RECIPE])
    assert a.rows == ["baseline", "combo"]                     # only what was added, plus the baseline
    argv = A.ablation_train_argv(a, "combo", 0)
    c = radjepa.make_config(radjepa.parse_args(argv))
    assert c.pred_depth == 2 and c.ema == pytest.approx(1 - (1 - 0.999) * 10 / 200)   # compressed like any row
    assert json.loads((tmp_path / "o" / "rows.json").read_text()) == {"combo": "--pred-depth 2 --ema 0.999"}
    b = A.ablate_args([out, "--rows", "combo", "--", *RECIPE])  # a later call knows it
    assert b.rows == ["baseline", "combo"] and b.all_rows[-1][3] == ["--pred-depth", "2", "--ema", "0.999"]
    for bad, msg in ((["combo", "--pred-depth 3"], "already defines it"), (["lr=1e-3", "--lr 1"], "must be new"),
                     (["x y", "--lr 1"], "must be new"), (["z", "pred-depth 3"], "FLAGS must be")):
        assert A.main([out, "--add-row", *bad, "--", *RECIPE]) == 2
        assert msg in capsys.readouterr().err


def test_a_bad_added_row_is_refused_with_its_reason_and_never_recorded(tmp_path, capsys):
    """Issue 22: `--add-row ID '--lr abc'` (or an unknown flag) printed radjepa's whole usage, ended with "error: row
    ID: 2" and stayed in OUT/rows.json, so the folder refused every later fix. Now: one line with the reason, before
    anything is recorded; the corrected row is then accepted."""
    out = tmp_path / "o"
    for flags, reason in (("--lr abc", "--lr: invalid float value: 'abc'"),
                          ("--nope 1", "unrecognized arguments: --nope 1"),
                          ("--pred-depth 0", "--pred-depth 0: must be an integer >= 1"),
                          ("--lr '1", "No closing quotation")):
        capsys.readouterr()
        assert A.main([str(out), "--add-row", "bad", flags, "--", *RECIPE]) == 2
        cap = capsys.readouterr()
        assert cap.err == f"error: row bad: {reason}\n" and "usage:" not in cap.out + cap.err, (flags, cap)
        assert not (out / "rows.json").exists()
    assert A.ablate_args([str(out), "--add-row", "bad", "--lr 1e-3", "--", *RECIPE]).rows == ["baseline", "bad"]
    assert json.loads((out / "rows.json").read_text()) == {"bad": "--lr 1e-3"}


def test_eval_py_ablate_prints_the_new_command(capsys):
    assert E.main(["ablate", "OUT", "--data", "my data", "--", "--lr", "1e-3"]) == 2
    assert capsys.readouterr().err == "error: the ablation harness moved; run: python -m bench.ablate OUT --data " \
                                      "'my data' -- --lr 1e-3\n"


def test_objective_rows_train_the_fork_and_leave_the_original_as_it_was(tiny, tmp_path, capsys):
    """Issue 26: the objective rows (examples/lejepa.py's SIGReg variants x 3 weights) run only when named, train
    through the fork (its objective in result.json; --no-ema: the probed target is the encoder itself), and restore
    radjepa's objective after, so the baseline trained next in the same process is I-JEPA (its target trails)."""
    assert A.OPT_IN == {f"sigreg={lam}" for lam in ("0.01", "0.1", "1")} | {
        f"sigreg-noema={lam}" for lam in ("0.1", "1", "10")}
    assert not set(A.ablate_args(["x"]).rows) & A.OPT_IN          # the recipe's factor table stays as it was
    before = radjepa.objective, radjepa.ema_update, radjepa.OBJECTIVE
    out = tmp_path / "o"
    argv = [str(out), "--data", str(tiny / "data"), "--steps", "2", "--seeds", "0", "--rows", "sigreg-noema=1",
            "--probe-sizes", "64", "--epochs", "1", "--seg-epochs", "1", "--n-boot", "30", "--mask-size", "32",
            "--", *RECIPE]
    assert A.main(argv[:9] + ["--no-baseline"] + argv[9:]) == 0
    assert (radjepa.objective, radjepa.ema_update, radjepa.OBJECTIVE) == before
    assert A.main(argv) == 0                                      # now the baseline, in the same process
    same = {}
    for rid in ("sigreg-noema=1", "baseline"):
        run = out / "s2" / rid / "seed0"
        res = json.loads((run / "result.json").read_text())
        assert res["status"] == "ok" and res["sizes"]["64"]
        ck = torch.load(run / "ckpt.pt", weights_only=False)
        same[rid] = (res["objective"], all(torch.equal(ck["encoder"][k], v) for k, v in ck["target_encoder"].items()))
    assert same == {"sigreg-noema=1": ("fork: smooth-L1 + 1*sigreg, no EMA/stop-grad (examples/lejepa.py)", True),
                    "baseline": (radjepa.OBJECTIVE, False)}
    assert "sigreg-noema=1" in (out / "ablation_s2.md").read_text()
    # --baseline-steps: a costlier row at fewer steps (same CPU time), compared with the baseline at its own length,
    # which this call never trains
    assert A.main(argv[:4] + ["1", "--baseline-steps", "2", "--no-baseline"] + argv[5:]) == 0
    assert not (out / "s1" / "baseline").exists()
    t1, t2 = (json.loads((out / f"ablation_s{n}.json").read_text())["rows"]["64"] for n in (1, 2))
    assert t1["baseline"]["metrics"]["grid/auroc"]["mean"] == t2["baseline"]["metrics"]["grid/auroc"]["mean"]
    g = t1["sigreg-noema=1"]["metrics"]["grid/auroc"]
    assert g["vs_baseline"]["diff"] == pytest.approx(g["mean"] - t2["baseline"]["metrics"]["grid/auroc"]["mean"])
    assert "recipe at **2 steps**" in (out / "ablation_s1.md").read_text()
    capsys.readouterr()
    # a bad value of the fork's own flags is one line, before anything is recorded or trained
    assert A.main([str(tmp_path / "o3"), "--add-row", "neg", "--sigreg-lambda -1", "--", *RECIPE]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: row neg: --sigreg-lambda must be >= 0 and --sigreg-dirs >= 1"
    assert not (tmp_path / "o3" / "rows.json").exists()
