"""The decoder that reads the image (issue 23 items 1-3): loss weights on finding sentences, the auxiliary findings
head, model selection on val CE F1, the sanity systems (oracle, shuffled features) on a toy set whose "image"
features encode the findings, example picking and the report.md verdict. Tiny models: each test takes seconds."""
import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data_prep as dp  # noqa: E402
import report_gen as R  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py
CPU = torch.device("cpu")


def test_abnormal_weights_mark_the_words_of_finding_sentences():
    text = "Heart size is normal. Small left effusion. No pneumothorax."
    w = R.abnormal_weights([text], 30, 5.0)[0]
    words = R.tokenize(text)                                   # position 0 of ids is <bos>: word k is at k + 1
    assert [w[k + 1].item() for k in range(len(words))] == [1.0] * 5 + [5.0] * 4 + [1.0] * 3
    assert w[len(words) + 1:].eq(1).all()                      # <eos> and padding: 1 (padding is masked anyway)
    short = R.abnormal_weights([text], 6, 5.0)[0]              # truncated like encode_reports: no overflow
    assert short.shape == (8,) and short[6].item() == 5.0


def args_for(**kw):
    a = dict(seed=0, report_width=64, report_layers=1, report_max_len=40, report_dropout=0.0, report_lr=5e-3,
             report_epochs=25, batch_size=16, report_aux=1.0, report_abnormal_weight=5.0, report_select="ce")
    a.update(kw)
    return argparse.Namespace(**a)


@pytest.fixture(scope="module")
def toy():
    """160 phantom reports; each "image" is 4 tokens of 8 features where token 0 holds the report's findings
    (+ noise) and the rest is noise: a decoder that reads its prefix can write every finding."""
    texts = [t["report"]["findings"] for t in dp.synthetic_tasks(160, 5)]
    labels = R.report_labels(texts)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(len(texts), 4, 8, generator=g) * 0.3
    feats[:, 0, :labels.shape[1]] += 2 * labels
    words = sorted({w for t in texts for w in R.tokenize(t)})
    vocab = {w: i for i, w in enumerate(R.REPORT_SPECIALS + words)}
    ids = R.encode_reports(texts, vocab, 40)
    tr, va, te = torch.arange(0, 112), torch.arange(112, 136), np.arange(136, 160)
    return texts, labels, feats, vocab, ids, tr, va, te


def ce_macro(model, prefix, rows, labels, vocab):
    inv = {i: w for w, i in vocab.items()}
    hyp = R.decode(model, prefix, rows, 1, 40, CPU)
    pred = R.report_labels([R.detokenize([inv[j] for j in s]) for s in hyp]).bool().numpy()
    return R.clinical_efficacy(pred, labels[rows].bool().numpy())["ce_f1_macro"]


def test_decoder_reads_the_prefix_and_shuffling_it_breaks_the_reports(toy):
    texts, labels, feats, vocab, ids, tr, va, te = toy
    inv = {i: w for w, i in vocab.items()}
    weights = R.abnormal_weights(texts, 40, 5.0)
    model, info = R.train_decoder(feats, ids, len(vocab), tr, va, args_for(), CPU, lambda m: None, "toy",
                                  labels=labels, weights=weights, inv=inv, val_labels=labels[va])
    assert info["val_ce_f1_macro"] is not None and 1 <= info["epoch"] <= 25
    assert model.aux is not None                                 # the auxiliary findings head was trained
    read = ce_macro(model, feats, te, labels, vocab)
    shuffled = feats.clone()
    shuffled[te] = feats[te[np.random.default_rng(0).permutation(len(te))]]
    assert read > 0.6, read                                      # it writes the findings it is shown (0.77)...
    assert ce_macro(model, shuffled, te, labels, vocab) < read - 0.4   # ...and only those (0.09, measured)


def test_oracle_decoder_writes_the_findings_it_is_given(toy):
    texts, labels, feats, vocab, ids, tr, va, te = toy
    inv = {i: w for w, i in vocab.items()}
    weights = R.abnormal_weights(texts, 40, 5.0)
    oracle, _ = R.train_decoder(labels[:, None, :], ids, len(vocab), tr, va, args_for(), CPU, lambda m: None,
                                "oracle", labels=labels, weights=weights, inv=inv, val_labels=labels[va])
    assert ce_macro(oracle, labels[:, None, :], te, labels, vocab) > 0.6


def test_selection_on_loss_and_no_image_decoder_need_no_labels(toy):
    texts, labels, feats, vocab, ids, tr, va, te = toy
    model, info = R.train_decoder(None, ids, len(vocab), tr, va, args_for(report_epochs=2), CPU, lambda m: None,
                                  "none", labels=labels, weights=None, inv=None, val_labels=None)
    assert info["val_ce_f1_macro"] is None and model.aux is None and model.proj is None
    model, info = R.train_decoder(feats, ids, len(vocab), tr, va, args_for(report_epochs=2, report_select="loss",
                                                                           report_aux=0.0), CPU, lambda m: None,
                                  "grid", labels=labels)
    assert info["val_ce_f1_macro"] is None and model.aux is None


def test_image_prefix_all_tokens_or_grid():
    tok = torch.randn(10, 16, 6)                                  # a 4 x 4 patch grid
    tr = np.arange(8)
    allt = R.image_prefix(tok, tr, argparse.Namespace(report_prefix="tokens", report_grid=2))
    grid = R.image_prefix(tok, tr, argparse.Namespace(report_prefix="grid", report_grid=2))
    assert allt.shape == (10, 16, 6) and grid.shape == (10, 4, 6)
    assert allt[tr].mean((0, 1)).abs().max() < 1e-5               # standardized on the train rows


def test_pick_examples_one_per_finding_and_one_normal():
    refs = ["No effusion. Mild cardiomegaly. Small left effusion.", "Mild cardiomegaly.", "Normal chest.",
            "Small right pneumothorax.", "Heart size is normal."]
    got = R.pick_examples(refs)
    assert got == [(1, "Cardiomegaly"), (0, "Effusion"), (3, "Pneumothorax"), (2, "normal")]


def test_report_markdown_verdict_and_per_finding_rows():
    def sys_(f1, n_ref=10):
        m = {k: 0.5 for k in R.REPORT_METRICS}
        m.update({k + "_ci": [0.4, 0.6] for k in R.REPORT_METRICS}, ce_f1_macro=f1, ce_f1_macro_ci=[f1 - .1, f1 + .1])
        m["ce_per_label"] = {n: {"n_ref": n_ref if n == "Effusion" else 0, "n_pred": 3,
                                 "f1": f1 if n == "Effusion" else None, "f1_ci": [0.1, 0.9]}
                             for n in R.LABELER_FINDINGS}
        return m
    t = lambda v, p: {"diff": 0.1, "p": p, "verdict": v, "resamples": 999}  # noqa: E731
    systems = {"jepa/beam3": sys_(0.6), "random/beam3": sys_(0.3), "none/beam3": sys_(0.0),
               "shuffled-jepa/beam3": sys_(0.1), "oracle/beam3": sys_(0.9), "retrieval-jepa": sys_(0.2)}
    vs = {"jepa/beam3": {k: {"ce_f1_macro": t("better", 0.002), "f1:Effusion": t("better", 0.01)}
                         for k in systems if k != "jepa/beam3"}}
    r = {"systems": systems, "vs": vs, "n_train": 100, "n_test": 40, "vocab_size": 50, "labels": list(R.LABELER_FINDINGS),
         "config": {"report_section": "findings", "report_layers": 2, "report_width": 64, "report_grid": 4,
                    "report_prefix": "tokens"},
         "examples": [{"id": "p1", "reference": "Small left effusion.", "finding": "Effusion", "jepa": "x"}]}
    md = "\n".join(R.report_markdown(r))
    verdict = next(line for line in md.splitlines() if line.startswith("**Verdict:**"))
    assert "0.600" in verdict and "significantly better than random init (0.300" in verdict
    assert "reads the image" in verdict and "oracle" in verdict
    assert "| Effusion | 10 |" in md and "| Effusion | p1 | Small left effusion. | x |" in md


# ------------------------------------------------------------------------- the guided decoder (--report-decoder)

def test_f1_thresholds_equal_brute_force_over_random_draws():
    """The chosen cut scores the best F1 of every possible cut (brute force over the distinct scores), ties in
    scores included, and lies strictly between two scores; nan rows are ignored; a label with no positive gets
    the probability's own cut, 0.5."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 40))
        y = (rng.random((n, 3)) < rng.random(3)).astype(float)
        s = np.round(rng.random((n, 3)) + y * rng.random(), 1)          # coarse: many tied scores
        y[rng.random((n, 3)) < 0.1] = np.nan
        thr = R.f1_thresholds(y, s)
        for j in range(3):
            k = np.isfinite(y[:, j])
            yj, sj = y[k, j] > 0.5, s[k, j]
            if not yj.any():
                assert thr[j] == (0.5 if k.any() else np.inf)
                continue
            f1 = lambda t: 2 * (yj & (sj >= t)).sum() / ((sj >= t).sum() + yj.sum())  # noqa: E731
            assert np.isclose(f1(thr[j]), max(f1(t) for t in np.unique(sj)))
            assert thr[j] == sj.min() or thr[j] not in sj


def guided_args(**kw):
    a = vars(args_for(report_epochs=25))
    a.update(report_decoder="guided", report_head="grid", grid=2, epochs=30, n_boot=50, report_min_count=1,
             report_section="findings", report_prefix="tokens", report_grid=2)
    a.update(kw)
    return argparse.Namespace(**a)


def test_guided_system_reads_the_image_and_the_checks_tell(toy):
    """report_task with --report-decoder guided on the toy set: the encoder whose tokens hold the findings writes
    them (CE F1 macro > 0.6), one whose tokens are noise stays at the level of the no-image prior, the shuffled
    system falls, the prior states every finding with positives for every patient, and the verdict says so."""
    texts, labels, feats, vocab, ids, tr, va, te = toy
    n = len(texts)
    split = np.array(["train"] * 112 + ["val"] * 24 + ["test"] * 24)
    data = {"split": split, "patients": np.array([f"p{i}" for i in range(n)]), "ids": [f"i{i}" for i in range(n)]}
    noise = torch.randn(n, 4, 8, generator=torch.Generator().manual_seed(1))
    fe = {(k, 32): {"tokens": t, "pooled": t.mean(1)} for k, t in (("jepa", feats), ("random", noise))}
    r, examples = R.report_task(data, texts, fe, ["jepa", "random"], 32, guided_args(), CPU, lambda m: None)
    s = r["systems"]
    assert s["oracle/greedy"]["ce_f1_macro"] > 0.8
    assert s["jepa/greedy"]["ce_f1_macro"] > 0.6
    assert s["shuffled-jepa/greedy"]["ce_f1_macro"] < s["jepa/greedy"]["ce_f1_macro"] - 0.3
    assert s["random/greedy"]["ce_f1_macro"] < s["jepa/greedy"]["ce_f1_macro"] - 0.3
    assert s["none/greedy"]["ce_f1_macro"] < 0.2                          # the decoder alone: the template
    prior = s["prior/greedy"]["ce_per_label"]        # every finding with val positives, for every patient
    val_pos = dict(zip(R.LABELER_FINDINGS, labels[va].sum(0).tolist()))
    assert {n: e["n_pred"] for n, e in prior.items()} == {n: 24 if val_pos[n] else 0 for n in prior}
    assert r["decoders"]["jepa"]["head"] == "grid" and r["config"]["report_decoder"] == "guided"
    assert set(r["vs"]["jepa/beam3"]) >= {"random/beam3", "none/beam3", "prior/beam3", "shuffled-jepa/beam3"}
    assert "prior/beam3" in r["vs"]["shuffled-jepa/beam3"]
    verdict = R.report_verdict(r)
    assert "significantly better than random init" in verdict and "reads the image" in verdict
