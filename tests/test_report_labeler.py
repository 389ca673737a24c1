"""The clinical-efficacy labeler on real-style report sentences (issue 23 item 4), and the report metrics pinned on
tiny cases computed by hand in the comments. Codes: 1 positive, 0 negative, -1 uncertain, absent = not mentioned."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import report_gen as R  # noqa: E402

P, N, U = R.POSITIVE, R.NEGATIVE, R.UNCERTAIN

SENTENCES = [
    # list negation: one "no" covers every finding of the list
    ("No focal consolidation, effusion or pneumothorax.", {"Consolidation": N, "Effusion": N, "Pneumothorax": N}),
    ("No pleural effusion, pneumothorax, or pulmonary edema.", {"Effusion": N, "Pneumothorax": N, "Edema": N}),
    ("Neither effusion nor pneumothorax is present.", {"Effusion": N, "Pneumothorax": N}),
    # heart size, said the many ways it is said
    ("Heart size is normal.", {"Cardiomegaly": N}),
    ("The heart is not enlarged.", {"Cardiomegaly": N}),
    ("The cardiomediastinal silhouette is within normal limits.", {"Cardiomegaly": N}),
    ("The cardiomediastinal silhouette is enlarged.", {"Cardiomegaly": P}),
    ("The heart is moderately enlarged.", {"Cardiomegaly": P}),
    ("Moderate cardiomegaly.", {"Cardiomegaly": P}),
    ("Enlarged cardiac silhouette.", {"Cardiomegaly": P}),
    ("Heart size is borderline.", {"Cardiomegaly": U}),
    ("Heart size is at the upper limits of normal.", {"Cardiomegaly": U}),
    # effusion: size, side, its sign, and its look-alike
    ("Small left pleural effusion.", {"Effusion": P}),
    ("Small bilateral pleural effusions are unchanged.", {"Effusion": P}),
    ("Blunting of the costophrenic angle.", {"Effusion": U}),           # a sign of fluid, not the fluid
    ("The left costophrenic angle is blunted.", {"Effusion": U}),
    ("Small pericardial effusion.", {}),                                 # not a pleural effusion
    ("No change in the small left effusion.", {"Effusion": P}),          # pseudo-negation
    # nodule / mass
    ("Pulmonary nodule cannot be excluded.", {"Nodule": U}),             # its "not" is no negation
    ("A 2 cm mass in the right upper lobe.", {"Nodule": P}),
    ("Massive left pleural effusion.", {"Effusion": P}),                 # massive is not a mass
    ("Calcified nodule in the left apex, a granuloma.", {}),             # benign, not a lesion (as CheXpert)
    ("A small nodular opacity is seen in the left upper zone.", {"Nodule": P}),
    # pneumothorax: resolution, "no evidence of", hedges
    ("The pneumothorax has resolved.", {"Pneumothorax": N}),
    ("Pneumothorax is no longer seen.", {"Pneumothorax": N}),
    ("No evidence of pneumothorax.", {"Pneumothorax": N}),
    ("Cannot exclude a small apical pneumothorax.", {"Pneumothorax": U}),
    ("There is a small left - sided pneumothorax .", {"Pneumothorax": P}),   # detokenized decoder output
    ("No pneumothorax is suspected.", {"Pneumothorax": N}),
    ("Small right hydropneumothorax.", {"Pneumothorax": P, "Effusion": P}),
    # scope: a new statement ends the negation; a hedge governs the findings after it
    ("No pneumothorax is seen and the heart is enlarged.", {"Pneumothorax": N, "Cardiomegaly": P}),
    ("No effusion but a small left pneumothorax.", {"Effusion": N, "Pneumothorax": P}),
    ("Possible small right effusion, no pneumothorax.", {"Effusion": U, "Pneumothorax": N}),
    ("Left basilar opacity which may represent atelectasis or pneumonia.", {"Atelectasis": U, "Pneumonia": U}),
    ("Atelectasis vs. pneumonia.", {"Atelectasis": U, "Pneumonia": U}),
    ("Findings suspicious for early pneumonia.", {"Pneumonia": U}),
    ("Questionable retrocardiac consolidation.", {"Consolidation": U}),
    # other cues, case and punctuation
    ("LUNGS ARE FREE OF CONSOLIDATION;   NEGATIVE FOR PNEUMONIA.", {"Consolidation": N, "Pneumonia": N}),
    ("Interval resolution of the right effusion.", {"Effusion": N}),
    ("The left effusion seen on the prior study has resolved.", {"Effusion": N}),
    ("No new consolidation.", {"Consolidation": N}),                     # our choice (see report_gen.py)
    ("Mild pulmonary vascular congestion.", {"Edema": U}),
    ("Mild interstitial pulmonary edema.", {"Edema": P}),
    ("Bibasilar atelectasis. Right lower lobe collapse.", {"Atelectasis": P}),
    ("No acute cardiopulmonary process.", {}),
]


@pytest.mark.parametrize("text,expected", SENTENCES)
def test_labeler_on_real_style_sentences(text, expected):
    got = R.finding_states(text)
    assert set(got) == set(R.LABELER_FINDINGS)
    assert {k: v for k, v in got.items() if v is not None} == expected


def test_report_state_is_the_strongest_mention_and_uncertain_counts_as_positive():
    text = "No pleural effusion. Possible small pneumothorax. Mild cardiomegaly. Heart size is normal."
    assert {k: v for k, v in R.finding_states(text).items() if v is not None} == \
        {"Effusion": N, "Pneumothorax": U, "Cardiomegaly": P}           # positive > uncertain > negative > none
    assert R.label_report(text) == {**dict.fromkeys(R.LABELER_FINDINGS, 0), "Pneumothorax": 1, "Cardiomegaly": 1}
    assert R.label_report(text, uncertain=0)["Pneumothorax"] == 0       # U-zeros on request
    assert len(SENTENCES) >= 40


# ---------------------------------------------------------------------------------------------------- metrics by hand

def test_bleu_brevity_penalty_and_corpus_pooling_by_hand():
    hyp, ref = "small left effusion .".split(), "there is a small left effusion .".split()
    # every n-gram of hyp is in ref: p1 = 4/4, p2 = 3/3, p3 = 2/2, p4 = 1/1; c = 4, r = 7 -> BP = exp(1 - 7/4)
    assert R.corpus_bleu([hyp], [ref], 4) == pytest.approx(math.exp(-0.75))
    # two reports pooled: the second adds "no effusion ." vs "no pneumothorax ." -> 1-grams 2/3 (no, .),
    # 2-grams 0/2 -> p2 = (3+0)/(3+2) = 3/5, p1 = (4+2)/(4+3) = 6/7; c = 7, r = 10 -> BP exp(1 - 10/7)
    h2, r2 = "no effusion .".split(), "no pneumothorax .".split()
    assert R.corpus_bleu([hyp, h2], [ref, r2], 2) == pytest.approx(math.exp(1 - 10 / 7) * math.sqrt(6 / 7 * 3 / 5))


def test_rouge_l_by_hand():
    # LCS of "no focal consolidation ." and "no consolidation or effusion ." = no consolidation . = 3;
    # P = 3/4, R = 3/5 -> F = 2PR/(P+R) = 2*3/(4+5) = 2/3
    assert R.rouge_l("no focal consolidation .".split(), "no consolidation or effusion .".split()) == \
        pytest.approx(2 / 3)


def test_clinical_efficacy_from_report_text_by_hand():
    """Three test reports, labelled from text. Labels in LABELER_FINDINGS order; only the ones used shown.
         reference                                   generated
      1  Small left effusion. Mild cardiomegaly.     Small left effusion. Heart size is normal.
      2  Moderate right pneumothorax.                No pneumothorax. Possible small effusion.
      3  No acute process.                           Mild cardiomegaly.
    Effusion:     ref 1 -; gen 1, 2 -> tp 1, fp 1, fn 0 -> F1 = 2/(2+1+0) = 2/3
    Cardiomegaly: ref 1;   gen 3    -> tp 0, fp 1, fn 1 -> F1 = 0
    Pneumothorax: ref 2;   gen none -> tp 0, fp 0, fn 1 -> F1 = 0
    micro: tp 1, fp 2, fn 2 -> P = 1/3, R = 1/3, F1 = 2/(2+2+2) = 1/3
    macro over the 3 labels with a positive reference: F1 (2/3 + 0 + 0)/3 = 2/9, P (1/2 + 0 + 0)/3 = 1/6,
    R (1 + 0 + 0)/3 = 1/3."""
    refs = ["Small left effusion. Mild cardiomegaly.", "Moderate right pneumothorax.", "No acute process."]
    gens = ["Small left effusion. Heart size is normal.", "No pneumothorax. Possible small effusion.",
            "Mild cardiomegaly."]
    names = list(R.LABELER_FINDINGS)
    lab = lambda ts: np.array([[R.label_report(t)[k] for k in names] for t in ts], bool)  # noqa: E731
    ce = R.clinical_efficacy(lab(gens), lab(refs))
    assert ce["ce_p_micro"] == pytest.approx(1 / 3) and ce["ce_r_micro"] == pytest.approx(1 / 3)
    assert ce["ce_f1_micro"] == pytest.approx(1 / 3)
    assert ce["ce_f1_macro"] == pytest.approx(2 / 9)
    assert ce["ce_p_macro"] == pytest.approx(1 / 6) and ce["ce_r_macro"] == pytest.approx(1 / 3)
