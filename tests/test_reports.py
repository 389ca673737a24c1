"""Tests for report generation: data (synthetic reports, MIMIC / IU X-ray / CheXpert Plus converters on fabricated
fixtures in their real layouts), the metrics against hand-computed values (and sacrebleu / rouge-score when they
happen to be installed), the labeler's negation rules, the decoder (cached decoding == full recomputation, overfits 8
reports exactly), and an end-to-end `eval.py --task report` run on a tiny checkpoint."""
import csv
import gzip
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data_prep as dp  # noqa: E402
import eval as E  # noqa: E402
import report_gen as R  # noqa: E402

S = 32


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def png(path, seed=0):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 32), dtype=np.uint8)).save(path)


def reports(out):
    with open(Path(out, "reports.csv"), newline="", encoding="utf-8") as f:
        return {r["image"]: r for r in csv.DictReader(f)}


def meta(out):
    return json.loads(Path(out, "meta.json").read_text())


def labels(out):
    with open(Path(out, "labels.csv")) as f:
        return {r["image"]: r for r in csv.DictReader(f)}


# ---------------------------------------------------------------------------------------------------- metrics by hand

def test_bleu_hand_values():
    hyp, ref = "the cat sat on the mat".split(), "the cat is on the mat".split()
    # clipped 1-gram matches: the x2, cat, on, mat = 5 of 6; 2-grams: the cat, on the, the mat = 3 of 5;
    # 3-grams: on the mat = 1 of 4; 4-grams: none of 3. Same length -> brevity penalty 1.
    assert R.bleu_stats(hyp, ref) == [5, 3, 1, 0, 6, 5, 4, 3, 6, 6]
    assert R.corpus_bleu([hyp], [ref], 1) == pytest.approx(5 / 6)
    assert R.corpus_bleu([hyp], [ref], 2) == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert R.corpus_bleu([hyp], [ref], 3) == pytest.approx(0.5)           # (5/6 * 3/5 * 1/4)^(1/3) = 1/8^(1/3)
    assert R.corpus_bleu([hyp], [ref], 4) == 0.0                            # no 4-gram match, no smoothing
    # brevity penalty: 2 words against 6 -> exp(1 - 6/2); the precisions are 1
    assert R.corpus_bleu([["the", "cat"]], [ref], 2) == pytest.approx(math.exp(-2))
    # clipping: "the" x4 against one "the" -> 1/4
    assert R.corpus_bleu([["the"] * 4], [["the", "cat"]], 1) == pytest.approx(0.25)
    # corpus-level: counts are pooled before the geometric mean (sentence B alone would score 0)
    a, b = list("abcd"), (["x", "y"], ["z", "w"])
    assert R.corpus_bleu([a, b[0]], [a, b[1]], 4) == pytest.approx((4 / 6 * 3 / 4 * 1 * 1) ** 0.25)
    assert R.corpus_bleu([[]], [ref]) == 0.0


def test_rouge_l_and_clinical_efficacy_hand_values():
    assert R.rouge_l(list("abcd"), list("aced")) == pytest.approx(0.75)    # LCS a c d = 3: P = R = 3/4
    assert R.rouge_l(list("ab"), list("abcd")) == pytest.approx(2 * 2 / 6)  # P = 1, R = 1/2 -> F = 2/3
    assert R.rouge_l([], list("ab")) == 0.0 and R.rouge_l(list("x"), list("ab")) == 0.0
    assert R.rouge_l(list("abab"), list("baba")) == pytest.approx(0.75)    # LCS 3 (aba or bab)
    ref = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 1, 0]], bool)
    pred = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0], [0, 0, 0]], bool)
    ce = R.clinical_efficacy(pred, ref)
    # label 0: tp 1 fn 1; label 1: tp 1 fn 1; label 2: fp 1, no positive reference (left out of macro)
    assert ce["ce_p_micro"] == pytest.approx(2 / 3) and ce["ce_r_micro"] == pytest.approx(2 / 4)
    assert ce["ce_f1_micro"] == pytest.approx(4 / (4 + 1 + 2))
    assert ce["ce_p_macro"] == pytest.approx(1.0) and ce["ce_r_macro"] == pytest.approx(0.5)
    assert ce["ce_f1_macro"] == pytest.approx(2 / 3)
    assert R.clinical_efficacy(pred[:, 2:], ref[:, 2:])["ce_f1_macro"] is None   # no positive reference at all


def test_metrics_match_reference_packages_when_installed():
    """Random corpora: our corpus BLEU equals sacrebleu's (no smoothing, pre-tokenized), ROUGE-L rouge-score's."""
    rng = np.random.default_rng(0)
    words = list("abcdefgh")
    hyps = [[words[i] for i in rng.integers(0, 8, rng.integers(3, 15))] for _ in range(30)]
    refs = [[words[i] for i in rng.integers(0, 8, rng.integers(3, 15))] for _ in range(30)]
    try:
        import sacrebleu
    except ImportError:
        sacrebleu = None
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        rouge_scorer = None
    if sacrebleu is None and rouge_scorer is None:
        pytest.skip("neither sacrebleu nor rouge-score is installed")
    if sacrebleu is not None:
        sb = sacrebleu.corpus_bleu([" ".join(h) for h in hyps], [[" ".join(r) for r in refs]], tokenize="none",
                                   smooth_method="none", force=True)
        assert R.corpus_bleu(hyps, refs) == pytest.approx(sb.score / 100, abs=1e-9)
    if rouge_scorer is not None:
        sc = rouge_scorer.RougeScorer(["rougeL"])
        for h, r in zip(hyps, refs):
            assert R.rouge_l(h, r) == pytest.approx(sc.score(" ".join(r), " ".join(h))["rougeL"].fmeasure)


@pytest.mark.parametrize("text,positive", [
    ("No pleural effusion.", set()),
    ("Without pneumothorax.", set()),
    ("The effusion has resolved.", set()),
    ("Pneumothorax is no longer seen. Cardiomegaly.", {"Cardiomegaly"}),
    ("No pleural effusion or pneumothorax.", set()),                       # one cue negates the whole clause
    ("No effusion but a small left pneumothorax.", {"Pneumothorax"}),      # "but" ends the negation
    ("Negative for pneumonia; patchy atelectasis at the left base.", {"Atelectasis"}),
    ("Small bilateral pleural effusions.", {"Effusion"}),
    ("The heart is moderately enlarged.", {"Cardiomegaly"}),
    ("Heart size is normal. The heart is not enlarged.", set()),
    ("Possible right lower zone consolidation.", {"Consolidation"}),       # hedged = positive
    ("A small nodular opacity in the left upper zone. No mass.", {"Nodule"}),
    ("Mild pulmonary edema. Resolution of the pneumothorax.", {"Edema"}),
    ("No acute cardiopulmonary process.", set()),
])
def test_labeler_negation_rules(text, positive):
    got = R.label_report(text)
    assert set(got) == set(R.LABELER_FINDINGS)
    assert {k for k, v in got.items() if v} == positive


# ---------------------------------------------------------------------------------------------------- synthetic reports

def test_phantom_reports_are_faithful_deterministic_and_varied():
    tasks = dp.synthetic_tasks(600, 3)
    assert [t["report"] for t in tasks] == [t["report"] for t in dp.synthetic_tasks(600, 3)]   # same seed, same text
    assert [t["report"] for t in tasks] != [t["report"] for t in dp.synthetic_tasks(600, 4)]
    for t in tasks:                          # the labeler recovers every phantom's labels from its own report exactly
        for text in (t["report"]["findings"], t["report"]["findings"] + " " + t["report"]["impression"]):
            got = R.label_report(text)
            assert {k: str(got[k]) for k in dp.SYNTH_LABELS} == t["labels"], text
            assert not any(v for k, v in got.items() if k not in dp.SYNTH_LABELS), text
        f, a, text = t["phantom"]["findings"], t["phantom"]["anatomy"], t["report"]["findings"]
        said = {k: s for s in text.split(". ") for k in ("Nodule", "Consolidation", "Effusion", "Pneumothorax")
                if R.label_report(s)[k]}                   # the sentence that reports each present finding
        for name in ("Nodule", "Consolidation"):           # side and zone follow the rendered position
            if f.get(name):
                x, y = f[name]["x"], f[name]["y"]
                frac = (y - a["apex"]) / ((a["dome_l"] if x > 0 else a["dome_r"]) - a["apex"])
                zone = "upper" if frac < 1 / 3 else "mid" if frac < 2 / 3 else "lower"
                assert f"{'left' if x > 0 else 'right'}" in said[name] and zone in said[name], said[name]
        if f.get("Effusion"):
            sides = f["Effusion"]["sides"]
            assert ("bilateral" in said["Effusion"]) == (len(sides) == 2)
            assert len(sides) == 2 or ("left" if sides[0] > 0 else "right") in said["Effusion"]
        if f.get("Pneumothorax"):
            assert ("left" if f["Pneumothorax"]["side"] > 0 else "right") in said["Pneumothorax"]
        assert ("enlarged" in text or "cardiomegaly" in text.lower()) == bool(a["cardiomegaly"])
    heart = {t["report"]["findings"].split(".")[0] for t in tasks if not t["phantom"]["anatomy"]["cardiomegaly"]}
    assert len(heart) == len(dp.SYNTH_PHRASES["heart_normal"])             # every phrasing is used
    sizes = " ".join(t["report"]["findings"] for t in tasks)
    assert all(w in sizes for w in ("small", "moderate", "large", "upper", "mid", "lower", "bilateral"))


def test_synthetic_writes_reports_csv(tmp_path):
    dp.main(["synthetic", str(tmp_path / "out"), "--n", "6", "--size", "32", "--workers", "1"])
    rep, lab = reports(tmp_path / "out"), labels(tmp_path / "out")
    assert set(rep) == set(lab) and all(r["findings"] and r["impression"] for r in rep.values())
    assert meta(tmp_path / "out")["reports"]["n_images_with_report"] == 6


# ---------------------------------------------------------------------------------------------------- converters

MIMIC_LABELS = ["Atelectasis", "Cardiomegaly"]


def write_gz_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        f.write(header + "\n" + "".join(",".join(r) + "\n" for r in rows))


MIMIC_FULL = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough

 FINDINGS:
 
 The heart is mildly enlarged.  There is a small left
 pleural effusion.
 
 IMPRESSION:
 
 Small left effusion.
"""


@pytest.mark.parametrize("separate", [False, True])
def test_mimic_reports(tmp_path, separate):
    src = tmp_path / "mimic"
    rep_root = tmp_path / "mimic-cxr-reports" if separate else src
    studies = {"50000001": MIMIC_FULL.encode(),                                       # findings + impression
               "50000002": b"FINAL REPORT\n IMPRESSION:\n  No acute process.\n",        # impression only
               "50000003": b"",                                                       # empty file
               "50000004": None,                                                      # no file
               "50000005": "FINDINGS AND IMPRESSION: Caf\xe9 normal.".encode("latin-1"),  # non-UTF-8 byte
               "50000006": b"WET READ: ___ no headers we know\n"}                      # no recognisable section
    imgs = [(f"d{i}", "10000032", st) for i, st in enumerate(studies, 1)] + [("d9", "10000032", "50000001")]
    for did, sid, st in imgs:
        png(src / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{st}" / f"{did}.jpg")
    for st, body in studies.items():
        if body is not None:
            p = rep_root / "files" / "p10" / "p10000032" / f"s{st}.txt"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(body)
    write_gz_csv(src / "mimic-cxr-2.0.0-split.csv.gz", "dicom_id,study_id,subject_id,split",
                 [[d, st, s, "train"] for d, s, st in imgs])
    write_gz_csv(src / "mimic-cxr-2.0.0-chexpert.csv.gz", "subject_id,study_id," + ",".join(MIMIC_LABELS),
                 [["10000032", st, "1.0", ""] for st in studies])
    out = tmp_path / "out"
    dp.main(["mimic", str(src), str(out), "--size", str(S), "--workers", "1"] +
            (["--reports", str(rep_root)] if separate else []))
    rep, lab, m = reports(out), labels(out), meta(out)
    assert len(lab) == 7                                                  # every image kept, with its labels
    assert rep["images/d1.png"]["findings"] == "The heart is mildly enlarged. There is a small left pleural effusion."
    assert rep["images/d1.png"]["impression"] == "Small left effusion."
    assert rep["images/d9.png"] == {**rep["images/d1.png"], "image": "images/d9.png"}   # one report per study
    assert rep["images/d2.png"]["findings"] == "" and rep["images/d2.png"]["impression"] == "No acute process."
    assert rep["images/d5.png"]["findings"] == rep["images/d5.png"]["impression"] == "Café normal."
    assert set(rep) == {"images/d1.png", "images/d2.png", "images/d5.png", "images/d9.png"}
    why = {s["image"]: s["reason"] for s in m["reports"]["skipped"]}
    assert why == {"d3": "empty file", "d4": "file not found", "d6": "no FINDINGS or IMPRESSION section"}
    assert m["n_skipped"] == 0 and lab["images/d3.png"]["Atelectasis"] == "1"


def test_mimic_without_reports_writes_no_reports_csv(tmp_path):
    src = tmp_path / "mimic"
    png(src / "files/p10/p10000032/s50000001/d1.jpg")
    write_gz_csv(src / "mimic-cxr-2.0.0-split.csv.gz", "dicom_id,study_id,subject_id,split",
                 [["d1", "50000001", "10000032", "train"]])
    write_gz_csv(src / "mimic-cxr-2.0.0-chexpert.csv.gz", "subject_id,study_id,Atelectasis", [])
    dp.main(["mimic", str(src), str(tmp_path / "out"), "--size", str(S), "--workers", "1"])
    assert not (tmp_path / "out" / "reports.csv").exists() and "reports" not in meta(tmp_path / "out")
    with pytest.raises(SystemExit, match="no files/ folder"):
        dp.main(["mimic", str(src), str(tmp_path / "o2"), "--reports", str(tmp_path), "--workers", "1"])


def iu_xml(uid, findings, impression, mesh, images, captions=None):
    sec = "".join(f'<AbstractText Label="{k}">{v}</AbstractText>' for k, v in
                  (("COMPARISON", "None."), ("FINDINGS", findings), ("IMPRESSION", impression)) if v is not None)
    caps = captions or [""] * len(images)
    ims = "".join(f'<parentImage id="{i}"><figureId>F{j}</figureId><caption>{c}</caption>'
                  f'<panel type="single"><url>/x/{i}.jpg</url></panel></parentImage>'
                  for j, (i, c) in enumerate(zip(images, caps), 1))
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<eCitation><meta type="rr"/><uId id="{uid}"/>'
            f'<MedlineCitation><Article><ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle>'
            f'<Abstract>{sec}</Abstract></Article></MedlineCitation>'
            f'<MeSH>{"".join(f"<major>{t}</major>" for t in mesh)}<minor>x</minor></MeSH>{ims}</eCitation>')


def test_iu_xray(tmp_path):
    src = tmp_path / "iu"
    xml = src / "ecgen-radiology"
    xml.mkdir(parents=True)
    (xml / "1.xml").write_text(iu_xml("CXR1", "The heart is normal. No effusion.", "Normal chest x-XXXX.", ["normal"],
                                      ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]))
    (xml / "2.xml").write_text(iu_xml("CXR2", None, "Borderline cardiomegaly.",                 # impression only
                                      ["Cardiomegaly/borderline", "Pleural Effusion/right/small", "Spine/degenerative"],
                                      ["CXR2_IM-0652-2001", "CXR2_IM-0652-1001"], ["Lateral", "PA"]))
    (xml / "3.xml").write_text(iu_xml("CXR3", "", "", ["No Indexing"], ["CXR3_IM-1-1001"]))       # empty sections
    (xml / "4.xml").write_bytes(iu_xml("CXR4", "Calcified granuloma, caf\xe9.", "No acute disease.", ["normal"],
                                       ["CXR4_IM-1-1001"]).encode("latin-1"))                      # non-UTF-8 byte
    (xml / "5.xml").write_text("<eCitation><uId id='CXR5'/>")                                      # broken XML
    (xml / "6.xml").write_text(iu_xml("CXR6", "x", "y", ["normal"], ["CXR6_IM-missing-1001"]))     # no image file
    for i in ("CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_IM-0652-2001", "CXR2_IM-0652-1001",
              "CXR3_IM-1-1001", "CXR4_IM-1-1001"):
        png(src / "NLMCXR_png" / f"{i}.png")
    out = tmp_path / "out"
    dp.main(["iu_xray", str(src), str(out), "--size", str(S), "--workers", "1"])
    lab, rep, m = labels(out), reports(out), meta(out)
    assert set(lab) == {"images/CXR1_1_IM-0001-3001.png", "images/CXR2_IM-0652-1001.png",   # frontal views only:
                        "images/CXR3_IM-1-1001.png", "images/CXR4_IM-1-1001.png"}          # first image / caption
    r2 = lab["images/CXR2_IM-0652-1001.png"]
    assert r2["patient"] == "CXR2" and (r2["Cardiomegaly"], r2["Effusion"], r2["Nodule"]) == ("1", "1", "0")
    assert all(v == "0" for k, v in lab["images/CXR1_1_IM-0001-3001.png"].items() if k in dp.IU_LABELS)
    assert all(lab["images/CXR3_IM-1-1001.png"][k] == "" for k in dp.IU_LABELS)           # "No Indexing": unknown
    assert rep["images/CXR2_IM-0652-1001.png"]["findings"] == ""
    assert rep["images/CXR2_IM-0652-1001.png"]["impression"] == "Borderline cardiomegaly."
    assert rep["images/CXR4_IM-1-1001.png"]["findings"] == "Calcified granuloma, café."
    assert "images/CXR3_IM-1-1001.png" not in rep
    assert [s["reason"] for s in m["reports"]["skipped"]] == ["no FINDINGS or IMPRESSION text"]
    reasons = " ".join(s["reason"] for s in m["skipped"])
    assert "unreadable XML" in reasons and "image file not found" in reasons
    dp.main(["iu_xray", str(src), str(tmp_path / "all"), "--size", str(S), "--workers", "1", "--views", "all"])
    assert len(labels(tmp_path / "all")) == 6


def test_chexpert_plus_reports(tmp_path):
    src = tmp_path / "CheXpert-v1.0-small"
    header = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(dp.CHEXPERT_LABELS)
    rels = [f"train/patient0000{i}/study1/view1_frontal.jpg" for i in (1, 2, 3)]
    for i, r in enumerate(rels):
        png(src / r, seed=i)
    (src / "train.csv").write_text(header + "\n" + "".join(
        f"CheXpert-v1.0-small/{r},F,50,Frontal,AP," + ",".join([""] * len(dp.CHEXPERT_LABELS)) + "\n" for r in rels))
    plus = tmp_path / "df_chexpert_plus_240401.csv"
    with open(plus, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path_to_image", "section_findings", "section_impression", "report"])
        w.writerow([rels[0].replace(".jpg", ".png"), "Left effusion,\n small.", "Effusion.", "..."])
        w.writerow([rels[1], "", "", "..."])                                   # no section text
    out = tmp_path / "out"
    dp.main(["chexpert", str(src), str(out), "--size", str(S), "--workers", "1", "--reports", str(plus)])
    rep, m = reports(out), meta(out)
    assert list(rep) == ["images/patient00001_study1_view1_frontal.png"]
    assert rep["images/patient00001_study1_view1_frontal.png"]["findings"] == "Left effusion, small."
    assert sorted(s["reason"] for s in m["reports"]["skipped"]) == ["no FINDINGS or IMPRESSION text",
                                                                   "no row for this image in the reports CSV"]


# ---------------------------------------------------------------------------------------------------- the decoder

def test_cached_beam_decoding_equals_full_recomputation():
    """beam 1 with the key/value cache == argmax decoding that re-runs the whole sequence every step."""
    torch.manual_seed(0)
    model = R.ReportDecoder(12, 3, 20, width=32, layers=2, max_len=9, dropout=0.0).eval()
    prefix = torch.randn(5, 3, 12)
    got = R.beam_search(model, prefix, 5, 1, 9, torch.device("cpu"))
    for i in range(5):
        words = [R.BOS]
        with torch.no_grad():
            while len(words) <= 9:
                nxt = int(model(prefix[i:i + 1], torch.tensor([words]))[0, -1].argmax())
                if nxt == R.EOS:
                    break
                words.append(nxt)
        assert got[i] == words[1:]
    assert all(len(s) <= 9 for s in R.beam_search(model, prefix, 5, 3, 9, torch.device("cpu")))   # length cap
    assert all(len(s) <= 4 for s in R.beam_search(model, prefix, 5, 3, 4, torch.device("cpu")))


def test_decoder_overfits_eight_reports_exactly():
    texts = [t["report"]["findings"] for t in dp.synthetic_tasks(8, 1)]
    assert len(set(texts)) == 8
    words = sorted({w for t in texts for w in R.tokenize(t)})
    vocab = {w: i for i, w in enumerate(R.REPORT_SPECIALS + words)}
    ids = R.encode_reports(texts, vocab, 60)
    torch.manual_seed(0)
    prefix = torch.randn(8, 4, 16)
    model = R.ReportDecoder(16, 4, len(vocab), width=32, layers=2, max_len=60, dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):                                   # exact from ~30 steps on (measured); 80 for margin
        loss = torch.nn.functional.cross_entropy(model(prefix, ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten(),
                                                 ignore_index=R.PAD)
        opt.zero_grad(); loss.backward(); opt.step()
    inv = {i: w for w, i in vocab.items()}
    for beam in (1, 3):
        out = R.beam_search(model, prefix, 8, beam, 60, torch.device("cpu"))
        assert [[inv[j] for j in s] for s in out] == [R.tokenize(t) for t in texts]


# ---------------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import radjepa
    root = tmp_path_factory.mktemp("report_e2e")
    data, run = root / "prep", root / "run"
    dp.main(["synthetic", str(data), "--n", "40", "--size", "64", "--seed", "0", "--workers", "1"])
    torch.manual_seed(0)
    radjepa.main(["--data", str(data), "--out", str(run), "--model", "vit_tiny", "--depth", "2", "--width", "64",
                  "--heads", "2", "--pred-width", "32", "--pred-depth", "1", "--patch", "16", "--img-size", "64",
                  "--batch-size", "8", "--steps", "2", "--warmup", "1", "--workers", "0", "--min-ctx", "4"])
    return data, run / "ckpt.pt", root


SMALL = ["--report-epochs", "2", "--report-width", "32", "--report-layers", "1", "--report-max-len", "40",
         "--n-boot", "30", "--batch-size", "16"]


@pytest.mark.parametrize("decoder", ["guided", "prefix"])
def test_eval_task_report_end_to_end(tiny, decoder):
    data, ckpt, root = tiny
    out = root / f"eval_{decoder}"
    assert E.main(["--ckpt", str(ckpt), "--data", str(data), "--out", str(out), "--task", "report",
                   "--report-decoder", decoder, "--epochs", "5"] + SMALL) == 0
    m = json.loads((out / "metrics.json").read_text())
    r = m["report"]
    extra = ["prior"] if decoder == "guided" else []                 # no image under the guided F1 rule
    systems = {f"{e}/{d}" for e in ["jepa", "random", "pixels", "none", "oracle", "shuffled-jepa"] + extra
               for d in ("greedy", "beam3")}
    assert set(r["systems"]) == systems | {"retrieval-jepa", "retrieval-random", "retrieval-pixels"}
    for s in r["systems"].values():
        for k in R.REPORT_METRICS:
            assert s[k] is None or 0.0 <= s[k] <= 1.0
    assert set(r["vs"]["jepa/beam3"]) == {"random/beam3", "pixels/beam3", "none/beam3", "shuffled-jepa/beam3",
                                          "oracle/beam3", "retrieval-jepa"} | {f"{e}/beam3" for e in extra}
    assert r["config"]["report_decoder"] == decoder
    if decoder == "guided":                    # one decoder (the oracle's) serves every encoder's findings head
        assert r["decoders"]["jepa"]["head"] == "attentive" and "findings" in r["decoders"]["random"]
        assert set(r["vs"]["shuffled-jepa/beam3"]) == {"prior/beam3"}
    assert "ce_f1_macro" in r["vs"]["jepa/beam3"]["random/beam3"]
    assert set(r["vs"]["retrieval-jepa"]) == {"retrieval-random", "retrieval-pixels"}
    assert 2 <= len(r["examples"]) <= 9 and all(e["reference"] for e in r["examples"])
    assert len({e["finding"] for e in r["examples"]}) == len(r["examples"])     # one per finding, one normal
    md = (out / "report.md").read_text()
    assert "## Report generation" in md and "| retrieval-jepa |" in md and "Classification" not in md
    assert "**Verdict:**" in md and "| oracle |" in md and "| shuffled-jepa |" in md
    assert (out / "report_examples.png").stat().st_size > 0


def test_eval_task_all_includes_report_and_missing_reports_is_one_line_error(tiny, tmp_path, capsys):
    data, ckpt, root = tiny
    out = root / "eval_all"
    assert E.main(["--ckpt", str(ckpt), "--data", str(data), "--out", str(out), "--task", "all", "--probe", "linear",
                   "--seg-epochs", "1", "--mask-size", "16", "--no-baselines"] + SMALL) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert "report" in m and "classification" in m and "segmentation" in m
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("labels.csv", "meta.json"):
        (bare / f).write_text((data / f).read_text())
    os.symlink(data / "images", bare / "images")
    capsys.readouterr()
    assert E.main(["--ckpt", str(ckpt), "--data", str(bare), "--out", str(tmp_path / "o"), "--task", "report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reports.csv" in err[0]


# ---------------------------------------------------------------------------------------------------- reports.csv

def _copy(data, dst, edit):
    """A copy of the prepared folder whose reports.csv passes through edit(bytes) -> bytes."""
    import shutil
    shutil.copytree(data, dst)
    (dst / "reports.csv").write_bytes(edit((dst / "reports.csv").read_bytes()))
    return dst


def test_reports_csv_paths_are_normalised_and_long_fields_work(tiny, tmp_path):
    """Issue 22: `./images/x.png` in reports.csv and `images/x.png` in labels.csv are one image (rows written
    differently were dropped silently); a 390 KB report field is read (it was a csv field-limit traceback)."""
    data = tiny[0]
    base = E.report_texts(E.read_prepared(str(data), "report"), "findings")
    assert sum(map(bool, base)) > 20
    long = "no effusion. " * 30000                                           # 390,000 characters
    def edit(raw):
        lines = raw.decode().splitlines(keepends=True)
        out = [lines[0]] + ["./" + ln if i % 2 else ln.replace("images/", "images//", 1)
                            for i, ln in enumerate(lines[1:])]
        first = next(csv.reader([out[1]]))
        out[1] = f'{first[0]},"{long}",{first[2]}\n'
        return "".join(out).encode()
    d = E.read_prepared(str(_copy(data, tmp_path / "d", edit)), "report")
    got = E.report_texts(d, "findings")
    assert [bool(t) for t in got] == [bool(t) for t in base]                 # every row found its image
    assert max(map(len, got)) >= len(long.strip())


@pytest.mark.parametrize("edit, message", [
    (lambda raw: raw.replace(b"image,findings,impression", b"image,finding,impression", 1),
     "reports.csv: header must start with image,findings,impression (got image,finding,impression)"),
    (lambda raw: raw[:raw.index(b"\n", 200)] + b"\xff" + raw[raw.index(b"\n", 200):], "not UTF-8 text (byte 0xff)"),
])
def test_bad_reports_csv_is_refused_before_any_feature_is_extracted(tiny, tmp_path, capsys, edit, message):
    """Issue 22: a wrong header (found after feature extraction, as "have 0, 0, 0") and non-UTF-8 bytes (silently
    replaced) are one-line errors naming the file (and the line), before any work."""
    data, ckpt, _ = tiny
    d = _copy(data, tmp_path / "d", edit)
    capsys.readouterr()
    assert E.main(["--ckpt", str(ckpt), "--data", str(d), "--out", str(tmp_path / "o"), "--task", "report"]) == 2
    cap = capsys.readouterr()
    assert cap.err.count("\n") == 1 and cap.err.startswith(f"error: {d / 'reports.csv'}") and message in cap.err
    if "UTF-8" in message:
        line = (d / "reports.csv").read_bytes()[:(d / "reports.csv").read_bytes().index(b"\xff")].count(b"\n") + 1
        assert f"reports.csv line {line}: not UTF-8" in cap.err
    assert "features" not in cap.out and not (tmp_path / "o" / "cache").exists()
