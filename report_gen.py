"""
report_gen.py: report generation, eval.py's third task (--task report): the paper's LLaVA-style evaluation,
small enough for a CPU. eval.py reads and checks the data (reports.csv before any work), extracts the frozen
features and calls report_task; this file holds the second model (a small causal decoder behind a projector
for the image prefix), its text metrics and the labeler. It builds on eval.py's metrics, pooling and
statistics (the one import between them: eval.py imports this file only where it is used).

Two designs (--report-decoder), measured against each other in BENCHMARKS.md section 15:
  guided (the default): frozen tokens -> a findings head (--report-head: eval.py's linear, grid or attentive
  probe, trained on the labeler's labels of the train reports, chosen on val macro AUROC) -> finding
  probabilities -> binary findings, each finding's threshold chosen for F1 on the val reports (f1_thresholds)
  -> the prefix of a decoder trained to write a report from its findings (the "oracle" decoder below, trained
  once on the true labels of the train reports and shared by every encoder). Why: a decoder trained on ~1,400
  reports writes a finding only where it is the likelier continuation, i.e. where the image makes it more than
  50% likely; a frozen encoder's features rarely make a finding of prevalence 0.15 that certain, so the
  LLaVA-style decoder below writes the normal template for nearly every image, although a probe on the same
  features ranks the findings well. Cutting each finding's probability where F1 is best is what CE F1 asks for.
  prefix: frozen tokens [N, g*g, D] -> every patch token (--report-prefix tokens; or the mean over each cell of a
  G x G grid, --report-prefix grid --report-grid G) -> standardize (train statistics) -> 2-layer MLP projector
  applied to each token (LLaVA-style) -> prefix of a causal transformer decoder per encoder, trained from scratch.
Either decoder: teacher forcing on the train reports. Loss: token cross-entropy with the words of finding
  sentences up-weighted (--report-abnormal-weight) + an auxiliary findings head read at <bos> (--report-aux;
  targets = the labeler's labels of the train reports). Kept: the epoch with the best val CE F1 macro of greedy
  val reports, ties by val loss (--report-select ce; or the lowest val loss) -> test decoded once, greedy and
  beam search (width 3), capped at --report-max-len words.
Text: the FINDINGS section (the IMPRESSION when a report has no findings; --report-section), lower-cased,
words and punctuation marks as tokens; the vocabulary is the train split's words seen at least
--report-min-count times, the rest is <unk>. Metrics compare generated and reference token lists:
  BLEU-n  corpus-level: clipped n-gram matches summed over the corpus / candidate n-grams summed, geometric
          mean over 1..n, times the brevity penalty exp(1 - r/c) when the total candidate length c <=
          reference length r. No smoothing (a corpus with no matching 4-gram scores 0), one reference.
  ROUGE-L F1 of the longest common subsequence (P = LCS/|cand|, R = LCS/|ref|), averaged over reports.
  Clinical efficacy (CE): label_report() on the generated and on the reference text; precision/recall/F1,
          micro (pooled counts) and macro (mean over labels with a positive reference in the test set).
Baselines under the same decoder and budget: random-init encoder, raw pixels, "none" (no prefix: the decoder
alone learns the most typical report), "prior" (guided only: no image under the same F1 rule, i.e. each finding
stated for every patient when that scores a higher val F1 than never stating it: the honest no-image level of a
system tuned for F1), and retrieval (the report of the nearest train image by cosine similarity of the
standardized mean-pooled tokens; "retrieval-jepa", and the same with each other encoder's tokens, which compares
the feature spaces with no training at all). Sanity systems: "oracle" (the decoder given the labeler's labels of
the reference as its prefix: can it write findings at all?) and "shuffled-jepa" (the JEPA system given another
test image's tokens: does it read the image? it should fall to the prior's level). CIs and p-values: eval.py's patient
bootstrap and paired test, also per finding.
"""
import collections
import copy
import math
import re
import textwrap
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

if __package__:  # installed: this file is radjepa.report_gen, its siblings radjepa.eval, ...
    from . import eval as E, plumbing
else:            # a clone: imported by eval.py from the repository root
    import eval as E
    import plumbing

REPORT_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD, BOS, EOS, UNK = range(4)

# Clinical efficacy needs the findings a report states, for generated and reference text alike. The rules below are
# written for real dictation (MIMIC-CXR, IU X-ray, CheXpert Plus), not only for the phantom template; their word
# lists are our own, informed by the public CheXpert labeler's mention and negation/uncertainty patterns
# (stanfordmlgroup/chexpert-labeler), reduced to regular expressions (no dependency parser on a CPU budget).
#
#   text -> lower case, whitespace collapsed, "left - sided" (detokenized output) -> "left-sided"
#        -> clauses: split at . ; : ! ? and at words that start a new statement (but, however, although,
#           except, whereas, "there is/are" ...)
#        -> mentions: every match of a finding's patterns (FINDING_MENTIONS; EXCLUDE removes look-alikes first:
#           "pericardial effusion", "calcified nodule", "massive" is not "mass" thanks to word boundaries)
#        -> each mention's state, in CheXpert's order: (1) uncertain if an "unsure exclusion" cue governs it
#           ("cannot exclude", "not ruled out"; their "not" is no negation); (2) negative if a negation
#           cue governs it ("no", "without", "negative for", "free of", "resolution of", "has resolved", "is no
#           longer seen"); (3) uncertain if a hedge governs it ("possible", "may represent", "questionable",
#           "suspicious for") or the mention is only a sign of the finding (WEAK: "blunting of the costophrenic
#           angle" for effusion, "vascular congestion" for edema, "borderline heart size"); else (4) positive.
#           A cue BEFORE the mention governs it when it is the nearest cue before it and no scope breaker
#           (a verb such as is/are/has, "and the", "there") lies between: "no focal consolidation, effusion or
#           pneumothorax" negates all three, "no pneumothorax is seen and the heart is enlarged" keeps the heart.
#           A cue AFTER it ("has resolved", "cannot be excluded") governs it when only the mention's own words lie
#           between ("the left effusion has resolved", "effusion and pneumothorax have resolved").
#           Pseudo-negations are removed first: "no change in the effusion" states an effusion.
#        -> the report's state per finding (CheXpert's aggregation): positive if any mention is positive, else
#           uncertain if any is uncertain, else negative if any is negative, else not mentioned (None).
#
# Uncertain mentions count as POSITIVE in the binary labels (CheXpert's "U-ones"; label_report(uncertain=0) gives
# "U-zeros"). Why: a hedge in a radiology report ("cannot exclude a small pneumothorax") is the radiologist
# raising the finding for follow-up; a generated report that omits it has lost clinical content, and one that
# hedges where the reference is definite has still raised it. U-zeros would instead reward a generator for
# hedging everything away. (The phantom reports never hedge, so the synthetic benchmark is the same either way.)
# Negated and unmentioned are both 0: "not reported".
# Unlike CheXpert, "no new X" is negative, not uncertain: a persisting old X is stated elsewhere in the report
# ("stable left effusion"), and "no new consolidation" is so common in follow-up dictation that reading it as a
# hedge would, under U-ones, make most follow-up reports "positive".
# Known limits: a comma does not end a negation ("no pneumothorax, small effusion" negates the effusion, as
# list negation needs); "X or Y" is not read as uncertainty (CheXpert reads it so); no temporal reasoning beyond
# "resolved" / "no longer".
POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1
_ADV = r"(?:(?:\w+ly|again|still|now|also) )*"                       # "is (now) mildly enlarged"
_HEART = (r"(?:heart(?: size)?|cardiac (?:silhouette|shadow|contour|size)|cardiomediastinal (?:silhouette|contours?"
          r"|shadow)|cardiac and mediastinal (?:silhouette|contours?))")
_BE = r"(?:(?:is|are|appears?|remains?|seems?|looks?)(?: to be)? )"
FINDING_MENTIONS = {
    "Atelectasis": r"atelecta\w*|collapsed?",
    # an enlarged cardiomediastinal silhouette is counted as cardiomegaly: there is no separate mediastinum label,
    # and in chest film reports it is how the heart's enlargement is often dictated
    "Cardiomegaly": rf"cardiomegaly|cardiac enlargement|enlargement of the {_HEART}|enlarged {_HEART}"
                    rf"|{_HEART} {_BE}?{_ADV}(?:enlarged|increased|large|prominent)",
    "Consolidation": r"consolidat\w*",
    "Edema": r"o?edema(?:tous)?",
    "Effusion": r"effusions?|pleural fluid|hydropneumothora(?:x|ces)|hydrothorax",
    "Nodule": r"nodul\w*|mass(?:es)?|tumou?rs?|neoplasms?|carcinoma|malignancy|(?:lung|pulmonary|cavitary|spiculated)"
              r" lesions?",
    "Pneumonia": r"(?:broncho)?pneumonias?|infectious process|infection",
    "Pneumothorax": r"(?:hydro)?pneumothora(?:x|ces)",
}
LABELER_FINDINGS = FINDING_MENTIONS                                     # the labels, in this order
# Signs of a finding rather than the finding: at most uncertain (CheXpert's post-negation uncertainty rules)
WEAK_MENTIONS = {
    "Cardiomegaly": rf"borderline (?:{_HEART}|cardiomegaly)|{_HEART} {_BE}?{_ADV}(?:borderline|top normal|at the "
                    r"upper limits? of normal)",
    "Edema": r"(?:pulmonary |vascular )+congestion|heart failure|chf|kerley b lines?",
    "Effusion": r"blunt\w* of (?:the )?(?:\w+ )?(?:costophrenic|cp) (?:angles?|sulc[ui]s?)|(?:costophrenic|cp) "
                r"(?:angles?|sulc[ui]s?) (?:blunting|(?:is |are )?(?:\w+ly )?blunted)|blunted (?:\w+ )?"
                r"(?:costophrenic|cp) angles?",
}
# Statements of a normal finding: an explicit negative ("heart size is normal")
NORMAL_MENTIONS = {
    "Cardiomegaly": rf"{_HEART} {_BE}?{_ADV}(?:normal|within normal limits|unremarkable|not enlarged)|normal "
                    rf"{_HEART}|normal(?:-| )sized heart",
}
EXCLUDE = r"pericardial effusions?|calcified (?:nodul\w*|granulom\w*)|mass effect|collapsed? (?:vertebra|vertebral)\w*"
_UNSURE_EXCLUSION = (r"cannot (?:be )?(?:entirely |completely |definitely )?(?:excluded?|ruled? out)|can ?not (?:be )?"
                     r"excluded|(?:is|are) not (?:entirely |completely )?(?:excluded|ruled out)|not (?:be )?excluded"
                     r"|difficult to exclude")
_NEGATION = (r"no|not|without|negative for|free of|absen(?:ce|t) of|resolution of|resolved|clearing of|clear of|"
             r"removal of|neither|nor|rather than|ruled out|exclude[ds]?")
_HEDGE = (r"possible|possibly|probable|questionable|question of|suspect(?:ed)?|suspicious(?: for)?|suspicion (?:of|for)"
          r"|concern(?:ing)? for|worrisome for|(?:may|might|could|would|can) (?:also )?(?:be|represent|reflect|indicate"
          r"|include|be due to|relate to)|differential (?:diagnosis )?(?:includes?|of)|versus|vs|equivocal"
          r"|indeterminate|less likely|unlikely|borderline|cannot be assessed|not (?:well )?(?:assessed|evaluated)")
_POST_NEGATION = (r"(?:has|have) (?:since )?(?:resolved|cleared|been removed|been excluded)|(?:is|are) "
                  r"(?:no longer|not) (?:seen|present|visible|evident|identified|demonstrated|visualized|appreciated)"
                  r"|(?:is|are) absent"
                  r"|(?:has|have) been ruled out|resolved|removed")
_POST_HEDGE = (r"(?:is|are) (?:suspected|questioned|possible|not excluded|a consideration|considered)|(?:cannot|can "
               r"not) be (?:entirely )?(?:excluded|ruled out)|(?:is|are) not (?:entirely )?(?:excluded|ruled out)"
               r"|(?:could|may|might) be present|(?:is|are) (?:not )?difficult to exclude|(?:is|are) less likely|"
               r"(?:is|are) unlikely|not (?:well )?(?:assessed|evaluated)|versus|vs")
# "no change in the effusion" states an effusion: these are read as no cue at all
PSEUDO_NEGATION = (r"no (?:significant |interval |appreciable |substantial )?(?:change|increase|decrease|worsening|"
                   r"improvement|progression)|not (?:significantly )?(?:changed|increased|decreased|worsened|"
                   r"improved)|not only|without (?:significant |interval )?change|gram[- ]negative")
SCOPE_BREAK = r"\b(?:is|are|was|were|has|have|had|which|that|there|and (?:the|a|an|there))\b"
CLAUSE_END = (r"[.;:!?]|\b(?:but|however|although|though|except|whereas|while|yet|apart from|aside from|otherwise)\b"
              r"|(?=\bthere (?:is|are|has|have)\b)")
_CUES = [("unsure", _UNSURE_EXCLUSION), (NEGATIVE, _NEGATION), (UNCERTAIN, _HEDGE)]   # alternatives in this order
_CUE_RE = re.compile("|".join(rf"(?P<c{i}>\b(?:{p})\b)" for i, (_, p) in enumerate(_CUES)))
_POST_RE = [(UNCERTAIN, re.compile(rf"\b(?:{_POST_HEDGE})\b")), (NEGATIVE, re.compile(rf"\b(?:{_POST_NEGATION})\b"))]
_MENTION_RE = {k: [(re.compile(rf"\b(?:{p})\b"), st) for p, st in
                   ((FINDING_MENTIONS[k], POSITIVE), (WEAK_MENTIONS.get(k), UNCERTAIN),
                    (NORMAL_MENTIONS.get(k), NEGATIVE)) if p] for k in FINDING_MENTIONS}


def _normalise(text):
    t = re.sub(r"\s+", " ", text.lower())
    t = re.sub(r"(?<=\w) ?- ?(?=\w)", "-", t)                 # "left - sided" (detokenized) -> "left-sided"
    t = re.sub(r"\bvs\.", "vs", t)                                 # "a vs. b" is one clause
    t = re.sub(rf"\b(?:{EXCLUDE})\b", " ", t)                     # look-alikes are not mentions
    return re.sub(rf"\b(?:{PSEUDO_NEGATION})\b", " ", t)          # nor cues


def _mention_state(clause, start, end, state):
    """The state of the mention clause[start:end] whose own wording says `state` (POSITIVE, or UNCERTAIN for a
    WEAK mention, NEGATIVE for a NORMAL one), by the cues around it (order in the header)."""
    if state == NEGATIVE:
        return NEGATIVE
    before = None                                                 # the nearest cue before, unless a breaker follows
    for m in _CUE_RE.finditer(clause, 0, start):
        before = None if re.search(SCOPE_BREAK, clause[m.end():start]) else _CUES[int(m.lastgroup[1:])][0]
    after = None                                                  # a cue right after the mention (its words only)
    rest = clause[end:]
    for st, rx in _POST_RE:
        m = rx.search(rest)
        if m and not re.search(SCOPE_BREAK, rest[:m.start()]) and len(rest[:m.start()].split()) <= 6:
            after = st
            break
    # CheXpert's order: an unsure exclusion before it, then negation, then hedging
    if before == "unsure":
        return UNCERTAIN                                          # "cannot exclude X"
    if before == NEGATIVE or after == NEGATIVE:
        return NEGATIVE                                           # "no X", "X has resolved"; "no X is suspected"
    if before == UNCERTAIN or after == UNCERTAIN:
        return UNCERTAIN                                          # "possible X", "X cannot be excluded"
    return state                                                  # POSITIVE (or UNCERTAIN for a WEAK mention)


def finding_states(text):
    """Report text -> {finding: POSITIVE 1 | UNCERTAIN -1 | NEGATIVE 0 | None (not mentioned)}, CheXpert's codes."""
    out = dict.fromkeys(FINDING_MENTIONS)
    rank = {POSITIVE: 3, UNCERTAIN: 2, NEGATIVE: 1, None: 0}      # the report's state: the strongest mention's
    for clause in re.split(CLAUSE_END, _normalise(text)):
        if not clause or not clause.strip():
            continue
        for name, pats in _MENTION_RE.items():
            for rx, state in pats:
                for m in rx.finditer(clause):
                    s = _mention_state(clause, m.start(), m.end(), state)
                    if rank[s] > rank[out[name]]:
                        out[name] = s
    return out


def label_report(text, findings=LABELER_FINDINGS, uncertain=1):
    """Report text -> {finding: 0/1}: positive = 1, uncertain = `uncertain` (1: U-ones, the default; why in the
    header), negative or not mentioned = 0."""
    states = finding_states(text)
    return {k: 1 if states[k] == POSITIVE else uncertain if states[k] == UNCERTAIN else 0 for k in findings}


def tokenize(text):
    """'No effusion; left-sided.' -> ['no', 'effusion', ';', 'left', '-', 'sided', '.']"""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def detokenize(words):
    return re.sub(r" ([.,;:!?])", r"\1", " ".join(words))


def bleu_stats(hyp, ref, max_n=4):
    """A report's statistics for corpus BLEU: [matches_1..n, candidate n-grams_1..n, |hyp|, |ref|]."""
    row = [0] * (2 * max_n) + [len(hyp), len(ref)]
    for n in range(1, max_n + 1):
        h = collections.Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
        r = collections.Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        row[n - 1] = sum(min(c, r[g]) for g, c in h.items())         # clipped: a word counts at most as often
        row[max_n + n - 1] = max(len(hyp) - n + 1, 0)                   # as it occurs in the reference
    return row


def bleu_from_stats(s, n, max_n=4):
    """Corpus BLEU-n from summed bleu_stats rows (definition in the section header)."""
    match, total, c, r = s[:max_n], s[max_n:2 * max_n], s[2 * max_n], s[2 * max_n + 1]
    if c == 0 or min(match[:n]) == 0:
        return 0.0
    log_p = sum(math.log(match[k] / total[k]) for k in range(n)) / n
    return (1.0 if c > r else math.exp(1 - r / c)) * math.exp(log_p)


def corpus_bleu(hyps, refs, n=4):
    return bleu_from_stats(np.sum([bleu_stats(h, r) for h, r in zip(hyps, refs)], 0), n)


def rouge_l(hyp, ref):
    """ROUGE-L F1 of two token lists (LCS by dynamic programming, one row at a time)."""
    if not hyp or not ref:
        return 0.0
    prev = [0] * (len(ref) + 1)
    for a in hyp:
        cur = [0]
        for j, b in enumerate(ref):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(hyp) + len(ref))    # = 2PR/(P+R) with P=lcs/|hyp|, R=lcs/|ref|


def clinical_efficacy(pred, ref):
    """pred, ref: bool [n, L] (labels of generated / reference reports). Micro and macro precision/recall/F1;
    a label enters the macro means only if it has a positive reference here; with no predicted positive,
    precision is 0."""
    tp, fp, fn = (pred & ref).sum(0), (pred & ~ref).sum(0), (~pred & ref).sum(0)
    div = lambda a, b: a / b if b else 0.0  # noqa: E731
    out = {"ce_p_micro": div(tp.sum(), tp.sum() + fp.sum()), "ce_r_micro": div(tp.sum(), tp.sum() + fn.sum()),
           "ce_f1_micro": div(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())}
    has = np.flatnonzero(tp + fn)
    if not len(has):
        return {k: None for k in list(out) + ["ce_p_macro", "ce_r_macro", "ce_f1_macro"]}
    out.update(ce_p_macro=float(np.mean([div(tp[j], tp[j] + fp[j]) for j in has])),
               ce_r_macro=float(np.mean([tp[j] / (tp[j] + fn[j]) for j in has])),
               ce_f1_macro=float(np.mean([2 * tp[j] / (2 * tp[j] + fp[j] + fn[j]) for j in has])))
    return {k: float(v) for k, v in out.items()}


REPORT_METRICS = ["bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "ce_p_micro", "ce_r_micro", "ce_f1_micro",
                  "ce_p_macro", "ce_r_macro", "ce_f1_macro"]


def label_f1(pred, ref):
    """Per-label F1 = 2tp / (2tp + fp + fn) of bool [n, L] arrays; NaN where a label has no positive reference
    (and, in a bootstrap resample, none drawn): such a label has no F1, as in the macro mean."""
    tp, fp, fn = (pred & ref).sum(0), (pred & ~ref).sum(0), (~pred & ref).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)


def report_statistics(hyps, refs, resamples):
    """Point values, bootstrap CIs and samples of every REPORT_METRICS entry, and per label (ce_per_label) its
    CE F1 with CI; the per-label samples are keyed ("all", "f1:<label>") for the paired tests."""
    stats = np.array([bleu_stats(h, r) for h, r in zip(hyps, refs)])
    rl = np.array([rouge_l(h, r) for h, r in zip(hyps, refs)])
    names = list(LABELER_FINDINGS)
    lab = lambda ts: np.array([[label_report(detokenize(t))[k] for k in names]  # noqa: E731
                               for t in ts], bool)
    pred, ref = lab(hyps), lab(refs)

    def metrics(idx):
        s = stats[idx].sum(0)
        return {**{f"bleu{n}": bleu_from_stats(s, n) for n in range(1, 5)}, "rouge_l": float(rl[idx].mean()),
                **clinical_efficacy(pred[idx], ref[idx]),
                **{f"f1:{n}": f for n, f in zip(names, label_f1(pred[idx], ref[idx]))}}
    point = metrics(np.arange(len(hyps)))
    boot = [metrics(idx) for idx in resamples]
    keys = REPORT_METRICS + [f"f1:{n}" for n in names]
    samples = {("all", k): np.array([np.nan if b[k] is None else b[k] for b in boot], float) for k in keys}
    out = {k: point[k] for k in REPORT_METRICS}
    out.update({k + "_ci": E.percentile_ci(samples[("all", k)]) for k in REPORT_METRICS})
    out["ce_per_label"] = {n: {"n_ref": int(ref[:, j].sum()), "n_pred": int(pred[:, j].sum()),
                               "f1": None if np.isnan(point[f"f1:{n}"]) else float(point[f"f1:{n}"]),
                               "f1_ci": None if np.isnan(point[f"f1:{n}"]) else
                               E.percentile_ci(samples[("all", f"f1:{n}")])}
                           for j, n in enumerate(names)}
    return out, samples


class DecoderBlock(nn.Module):
    """Pre-norm causal self-attention + MLP. forward(x, cache): x = (B, T, W) new positions; cache = (k, v) of
    the positions before them, or None. -> (out, (k, v) including x's): decoding feeds a word at a time."""

    def __init__(self, width, heads, dropout):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, cache=None):
        B, T, W = x.shape
        # (B,H,T,dh)
        q, k, v = self.qkv(self.n1(x)).view(B, T, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:                                  # one new position: it may see every cached one
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None and T > 1)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, T, W)))
        return x + self.drop(self.mlp(self.n2(x))), (k, v)


class ReportDecoder(nn.Module):
    """prefix features (B, P, F) -> projector Linear-GELU-Linear, applied to each of the P tokens (LLaVA-style)
    -> P prefix tokens, then <bos> w1 .. wn; a causal transformer predicts every next word. n_prefix = 0: the
    no-image baseline (the decoder alone). n_labels > 0 adds an auxiliary head on the hidden state at <bos>
    (which has attended to the whole prefix) predicting the report's findings: it makes the prefix pathway carry
    the findings from the first step, instead of leaving it to the few words that name them."""

    def __init__(self, feat_dim, n_prefix, vocab_size, width=256, layers=4, max_len=100, dropout=0.1, n_labels=0):
        super().__init__()
        self.n_prefix = n_prefix
        self.proj = nn.Sequential(nn.Linear(feat_dim, width), nn.GELU(), nn.Linear(width, width)) \
            if n_prefix else None
        self.embed = nn.Embedding(vocab_size, width)
        # prefix, <bos>, words, <eos>
        self.pos = nn.Parameter(torch.randn(n_prefix + max_len + 2, width) * 0.02)
        self.blocks = nn.ModuleList(DecoderBlock(width, E.n_heads(width), dropout) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab_size)
        self.aux = nn.Linear(width, n_labels) if n_labels and n_prefix else None

    def step(self, x, start, caches=None, hidden=False):
        """x (B, T, W) at positions start.. -> logits (B, T, V) and the updated per-layer caches (and the final
        normalised hidden states (B, T, W) if hidden)."""
        x = x + self.pos[start:start + x.shape[1]]
        new = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, None if caches is None else caches[i])
            new.append(kv)
        h = self.norm(x)
        return (self.head(h), new, h) if hidden else (self.head(h), new)

    def start(self, prefix, words, hidden=False):
        """Prefix + words at once -> (logits of the word positions (B, L, V), caches[, hidden at those])."""
        x = self.embed(words)
        if self.proj is not None:
            x = torch.cat([self.proj(prefix), x], 1)
        logits, caches, h = self.step(x, 0, hidden=True)
        out = logits[:, self.n_prefix:], caches
        return out + (h[:, self.n_prefix:],) if hidden else out

    def forward(self, prefix, words, aux=False):      # teacher forcing: words = <bos> w1 .. wn <eos> <pad>..
        """-> word logits (B, L, V), and with aux=True also the finding logits (B, n_labels) read at <bos>."""
        logits, _, h = self.start(prefix, words, hidden=True)
        return (logits, self.aux(h[:, 0])) if aux else logits


@torch.no_grad()
def beam_search(model, prefix, n, beam, max_len, device):
    """Decodes n reports (prefix (n, P, F) or None). Returns token-id lists (no <bos>/<eos>). Score = summed
    log-probability, no length normalisation; a beam that emitted <eos> is finished and only extends with
    <eos> at no cost; at most max_len words. beam = 1 is greedy decoding."""
    model.eval()
    words = torch.full((n * beam, 1), BOS, device=device)
    pre = None if prefix is None else prefix.to(device).repeat_interleave(beam, 0)
    logits, caches = model.start(pre, words)
    score = torch.full((n, beam), -math.inf, device=device)
    score[:, 0] = 0.0                                       # all beams start identical: expand only the first
    seqs = torch.empty((n * beam, 0), dtype=torch.long, device=device)
    done = torch.zeros(n * beam, dtype=torch.bool, device=device)
    for t in range(max_len + 1):
        logp = torch.log_softmax(logits[:, -1].float(), -1)       # (n*beam, V)
        logp[done] = -math.inf
        logp[done, EOS] = 0.0
        if t == max_len:                                          # length cap: only <eos> is left
            keep = logp[:, EOS].clone(); logp.fill_(-math.inf); logp[:, EOS] = keep
        V = logp.shape[1]
        cand = (score.view(n, beam, 1) + logp.view(n, beam, V)).view(n, beam * V)
        score, flat = cand.topk(beam, 1)                           # (n, beam)
        parent = (flat // V + torch.arange(n, device=device)[:, None] * beam).view(-1)
        tok = (flat % V).view(-1)
        seqs = torch.cat([seqs[parent], tok[:, None]], 1)
        done = done[parent] | (tok == EOS)
        if done.all():
            break
        if beam > 1:                                              # each beam continues its parent's history
            caches = [(k[parent], v[parent]) for k, v in caches]
        logits, caches = model.step(model.embed(tok[:, None]), model.n_prefix + 1 + t, caches)
    best = score.argmax(1) + torch.arange(n, device=device) * beam
    out = []
    for s in seqs[best].tolist():
        out.append(s[:s.index(EOS)] if EOS in s else s)
    return out


def encode_reports(texts, vocab, max_len):
    """Token-id tensor (N, max_len + 2): <bos> words (truncated to max_len) <eos>, right-padded with <pad>."""
    ids = torch.full((len(texts), max_len + 2), PAD, dtype=torch.long)
    for i, t in enumerate(texts):
        w = [vocab.get(x, UNK) for x in tokenize(t)[:max_len]]
        ids[i, :len(w) + 2] = torch.tensor([BOS] + w + [EOS])
    return ids


def abnormal_weights(texts, max_len, weight):
    """Per-position loss weights aligned with encode_reports' ids: `weight` on the words (and the full stop) of
    every sentence the labeler finds a finding in, 1 elsewhere. Why: on these reports most words are the normal
    template, so the cross-entropy is minimised by the template; the few words that name a finding are exactly
    the ones that need the image, and up-weighting them makes reading the image pay."""
    w = torch.ones(len(texts), max_len + 2)
    for i, t in enumerate(texts):
        pos = 1                                                   # position 0 is <bos>
        for sent in re.findall(r"[^.]*(?:\.|$)", t):
            n = len(tokenize(sent))
            if n and any(label_report(sent).values()):
                w[i, pos:min(pos + n, max_len + 1)] = weight
            pos += n
    return w


def report_labels(texts):
    """The labeler's binary labels (U-ones) of each text -> float tensor (N, L), LABELER_FINDINGS order."""
    return torch.tensor([[label_report(t)[k] for k in LABELER_FINDINGS] for t in texts], dtype=torch.float)


def decode(model, prefix, rows, beam, max_len, device, chunk=128):
    """Token-id lists for the given rows (prefix None: the no-image decoder)."""
    out = []
    for i in range(0, len(rows), chunk):
        r = rows[i:i + chunk]
        out += beam_search(model, None if prefix is None else prefix[r], len(r), beam, max_len, device)
    return out


def train_decoder(prefix, ids, vocab_size, tr, va, args, device, log, name, labels=None, weights=None,
                  inv=None, val_labels=None):
    """Teacher forcing, AdamW + cosine schedule over --report-epochs. The loss is the token cross-entropy,
    weighted by `weights` (abnormal_weights), plus --report-aux times the findings loss (BCE of the auxiliary
    head against `labels`, the labeler's labels of the train reports). Model selection: with --report-select ce
    (and val_labels given), the epoch whose greedy val reports have the highest CE F1 macro, ties broken by the
    lower val loss: val loss alone keeps a decoder that writes the template well and the findings badly;
    --report-select loss: the lowest val loss (token-averaged, unweighted). -> (model, {val_loss, val_ce_f1_macro,
    epoch})."""
    torch.manual_seed(args.seed)
    n_prefix, feat_dim = prefix.shape[1:] if prefix is not None else (0, 0)
    aux_w = args.report_aux if labels is not None and n_prefix else 0.0
    model = ReportDecoder(feat_dim, n_prefix, vocab_size, args.report_width, args.report_layers,
                          args.report_max_len, args.report_dropout,
                          n_labels=labels.shape[1] if aux_w else 0).to(device)
    get = lambda rows: None if prefix is None else prefix[rows].to(device)  # noqa: E731

    def loss_of(rows, weighted):
        n = int((ids[rows] != PAD).sum(1).max())                       # cut the batch's all-<pad> columns
        w = ids[rows, :n].to(device)
        logits, aux = model(get(rows), w[:, :-1], aux=True) if aux_w else (model(get(rows), w[:, :-1]), None)
        ce = F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), ignore_index=PAD, reduction="none")
        mask = (w[:, 1:] != PAD).flatten().float()
        tw = mask * (weights[rows, 1:n].to(device).flatten() if weighted and weights is not None else 1.0)
        loss = (ce * tw).sum() / tw.sum()
        if aux is not None and weighted:
            loss = loss + aux_w * F.binary_cross_entropy_with_logits(aux, labels[rows].to(device))
        return loss
    opt = torch.optim.AdamW(model.parameters(), lr=args.report_lr, weight_decay=0.01)
    steps = args.report_epochs * math.ceil(len(tr) / args.batch_size)
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    g = torch.Generator().manual_seed(args.seed)
    by_ce = args.report_select == "ce" and val_labels is not None and n_prefix > 0
    best = ((-math.inf, -math.inf), 0, None, None)
    for epoch in tqdm(range(1, args.report_epochs + 1), desc=f"decoder {name}", leave=False):
        model.train()
        for idx in torch.randperm(len(tr), generator=g).split(args.batch_size):
            loss = loss_of(tr[idx], True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step(); sched.step()
        model.eval()
        with torch.no_grad():                                  # token-weighted mean over the val split
            n_tok = [(ids[va[i:i + 256], 1:] != PAD).sum().item() for i in range(0, len(va), 256)]
            val = sum(loss_of(va[i:i + 256], False).item() * k
                      for i, k in zip(range(0, len(va), 256), n_tok)) / sum(n_tok)
        ce = None
        if by_ce:                                              # greedy val reports, labelled like test ones
            hyp = decode(model, prefix, va, 1, args.report_max_len, device)
            pred = report_labels([detokenize([inv[j] for j in s]) for s in hyp]).bool().numpy()
            ce = clinical_efficacy(pred, val_labels.bool().numpy())["ce_f1_macro"] or 0.0
        key = (ce if by_ce else 0.0, -val)
        if key > best[0]:
            best = (key, epoch, copy.deepcopy(model.state_dict()), val)
    model.load_state_dict(best[2])
    ce_txt = f", val CE F1 macro {best[0][0]:.3f}" if by_ce else ""
    log(f"    decoder {name}: kept epoch {best[1]} of {args.report_epochs} (val loss {best[3]:.4f}{ce_txt}; "
        f"selected on {'val CE F1 macro, then loss' if by_ce else 'val loss'})")
    return model, {"val_loss": best[3], "epoch": best[1], "val_ce_f1_macro": best[0][0] if by_ce else None}


def nearest_train(tokens, tr, te):
    """Retrieval: each te row's nearest tr row (cosine similarity of standardized mean-pooled tokens)."""
    pooled = tokens.float().mean(1)
    mu, sd = E.standardizer(pooled[tr])
    z = F.normalize((pooled - mu) / sd, dim=1)
    return tr[(z[te] @ z[tr].T).argmax(1).numpy()]


def image_prefix(tokens, tr, args):
    """Frozen tokens (N, g*g, D) -> the decoder's prefix features, standardized with train statistics:
    --report-prefix tokens: every patch token (g*g prefix tokens, the LLaVA recipe: small findings stay in their
    own token); grid: tokens mean-pooled on a --report-grid square grid (G*G prefix tokens, the older default)."""
    if args.report_prefix == "grid":
        D = tokens.shape[2]
        tokens = E.grid_pool(tokens, args.report_grid).view(len(tokens), D, -1).transpose(1, 2)   # (N, G*G, D)
    tokens = tokens.float()
    mu, sd = E.standardizer(tokens[tr])
    return (tokens - mu) / sd


def f1_thresholds(y, s):
    """Per label, the score threshold that maximises F1 on these rows (y [n, L] 0/1 with nan = unknown, s [n, L]
    probabilities): predict positive where s >= threshold. The cut lies midway between the lowest score kept and
    the next lower one (not on a val score itself, which would be brittle on new images). A label with no
    positive here gets 0.5 if it has any known row (nothing to tune on: the probability's own cut), else inf.
    Why not 0.5 everywhere: for a finding of prevalence 0.15 that a head separates only partly, the F1-optimal cut
    is far below 0.5; a decoder that writes a finding only when it is the likelier outcome misses most of them."""
    out = np.full(y.shape[1], np.inf)
    for j in range(y.shape[1]):
        k = np.isfinite(y[:, j])
        yj, sj = y[k, j] > 0.5, s[k, j]
        if not yj.any():
            out[j] = 0.5 if k.any() else np.inf
            continue
        order = np.argsort(-sj, kind="stable")
        ss = sj[order]
        tp = np.cumsum(yj[order]); fp = np.cumsum(~yj[order])     # predicting the top i+1 as positive
        f1 = 2 * tp / (2 * tp + fp + (yj.sum() - tp))
        last = np.r_[ss[1:] != ss[:-1], True]                     # only cut between distinct scores
        i = int(np.argmax(np.where(last, f1, -1)))
        out[j] = (ss[i] + ss[i + 1]) / 2 if i + 1 < len(ss) else ss[i]
    return out


def findings_head(feats, labels, has, data, args, device, log, name):
    """The guided decoder's first stage: a probe (--report-head: eval.py's linear, grid or attentive probe, fit on
    the train reports' labeler labels, chosen on val macro AUROC) -> finding probabilities of every row ->
    binary findings with per-finding thresholds chosen for F1 on the val reports. -> (findings (N, L) float,
    info)."""
    y = labels.numpy().astype(np.float64)
    y[~has] = np.nan                                           # images without a report: unknown
    rows = np.arange(len(y))
    probs, hp = E.fit_classification(args.report_head, feats, {"labels": y, "split": data["split"]}, args,
                                      device, log, rows=rows)
    va = np.flatnonzero((data["split"] == "val") & has)
    thr = f1_thresholds(y[va], probs[va])
    pred = probs >= thr
    f1 = label_f1(pred[va], y[va] > 0.5)                      # nan where val has no positive
    per = {n: {"threshold": None if not np.isfinite(t) else float(t),
               "val_f1": None if np.isnan(f) else float(f)} for n, t, f in zip(LABELER_FINDINGS, thr, f1)}
    log(f"    findings head {name} ({args.report_head}): val macro AUROC {hp['val_macro_auroc']:.3f}; val F1 "
        + ", ".join(f"{n} {v['val_f1']:.2f}" for n, v in per.items() if v["val_f1"] is not None))
    return torch.from_numpy(pred).float(), {"head": args.report_head, **hp, "findings": per}


def report_task(data, text, feats, enc_names, size, args, device, log):
    """text: the report of every dataset row ("" = none; eval.report_texts, checked before any feature was
    extracted). Trains and scores every system; returns (metrics["report"], examples for the pictures).
    Systems: one per encoder, "none" (no image), "oracle" (the decoder given the labeler's labels of the
    reference itself as its prefix: the ceiling, shows the decoder can write findings when it is told them),
    "shuffled-jepa" (the JEPA system given another test image: if it reads the image, its CE F1 falls to the
    level of a report about a random patient), and retrieval with each encoder's features.
    --report-decoder guided (the default): each encoder's system is findings_head (image -> findings) feeding
    the oracle's decoder (findings -> words); prefix: a decoder per encoder on the image tokens themselves."""
    has = np.array([bool(t) for t in text])
    tr, va, te = (np.flatnonzero((data["split"] == s) & has) for s in plumbing.SPLITS)
    counts = collections.Counter(w for i in tr for w in tokenize(text[i]))
    vocab = {w: i for i, w in enumerate(REPORT_SPECIALS + sorted(w for w, c in counts.items()
                                                                  if c >= args.report_min_count))}
    inv = {i: w for w, i in vocab.items()}
    ids = encode_reports(text, vocab, args.report_max_len)
    weights = abnormal_weights(text, args.report_max_len, args.report_abnormal_weight)
    labels = report_labels(text)                                 # (N, L): aux targets, oracle prefix, val CE
    refs = [tokenize(text[i]) for i in te]
    pats = data["patients"][te]
    groups = [np.flatnonzero(pats == p) for p in dict.fromkeys(pats)]
    resamples = E.bootstrap_indices(groups, args.n_boot, args.seed)
    guided = args.report_decoder == "guided"
    log(f"report: {len(tr)}/{len(va)}/{len(te)} train/val/test reports, vocabulary {len(vocab)} words "
        f"(min count {args.report_min_count}), section {args.report_section}, decoder {args.report_decoder} "
        + (f"({args.report_head} findings head)" if guided else f"(prefix {args.report_prefix}"
           + (f" {args.report_grid}x{args.report_grid})" if args.report_prefix == "grid" else ")"))
        + f", train reports with a finding {int(labels[tr].amax(1).sum())}")
    trt, vat = torch.from_numpy(tr), torch.from_numpy(va)
    hyps, info, models, prefixes = {}, {}, {}, {}

    def generate(name, model, prefix):
        for mode, k in (("greedy", 1), ("beam3", 3)):
            hyps[f"{name}/{mode}"] = [[inv[j] for j in s] for s in decode(model, prefix, te, k,
                                                                          args.report_max_len, device)]
    for name in ["oracle", "none"] + ([] if guided else enc_names):
        prefix = None if name == "none" else labels[:, None, :] if name == "oracle" else \
            image_prefix(feats[(name, size)]["tokens"], tr, args)
        t0 = time.time()
        model, info[name] = train_decoder(prefix, ids, len(vocab), trt, vat, args, device, log, name,
                                          labels=labels, weights=weights, inv=inv, val_labels=labels[va])
        generate(name, model, prefix)
        info[name]["seconds"] = round(time.time() - t0, 1)
        models[name], prefixes[name] = model, prefix
    for name in enc_names if guided else ():                     # image -> findings -> the oracle's decoder
        t0 = time.time()
        found, info[name] = findings_head(feats[(name, size)], labels, has, data, args, device, log, name)
        prefixes[name] = found[:, None, :]                       # (N, 1, L): the oracle decoder's prefix
        models[name] = models["oracle"]
        generate(name, models[name], prefixes[name])
        info[name]["seconds"] = round(time.time() - t0, 1)
    if guided:     # no image under the same F1 rule: the constant prevalence scores, cut where F1 is best on val
        prior = np.tile(labels[tr].numpy().mean(0), (len(labels), 1))
        prefixes["prior"] = torch.from_numpy(prior >= f1_thresholds(labels[va].numpy(), prior[va])).float()[:, None]
        generate("prior", models["oracle"], prefixes["prior"])
    if "jepa" in models:                                         # the image is read <=> this falls
        perm = te[np.random.default_rng(args.seed).permutation(len(te))]
        shuffled = prefixes["jepa"].clone()
        shuffled[te] = prefixes["jepa"][perm]
        generate("shuffled-jepa", models["jepa"], shuffled)
    rank = {n: i for i, n in enumerate(enc_names + ["none", "prior", "oracle", "shuffled-jepa"])}  # table order
    hyps = dict(sorted(hyps.items(), key=lambda kv: rank[kv[0].split("/")[0]]))
    for name in enc_names:
        near = nearest_train(feats[(name, size)]["tokens"], tr, te)
        hyps[f"retrieval-{name}"] = [tokenize(text[i]) for i in near]
    res, samples = {}, {}
    for key, h in hyps.items():
        res[key], samples[key] = report_statistics(h, refs, resamples)
        log(f"    {key}: BLEU-4 {E.fmt(res[key]['bleu4'], res[key]['bleu4_ci'])}  ROUGE-L "
            f"{res[key]['rouge_l']:.3f}  CE F1 micro {E.fmt(res[key]['ce_f1_micro'])} macro "
            f"{E.fmt(res[key]['ce_f1_macro'])}")
    vs = {}
    def val(k):                                   # a metric's point value, per-label F1 included
        return lambda _, m: res[k]["ce_per_label"][m[3:]]["f1"] if m.startswith("f1:") else res[k][m]
    pairs = [(f"jepa/{d}", b) for d in ("greedy", "beam3") for b in
             [f"{n}/{d}" for n in enc_names[1:] + ["none", "prior", "shuffled-jepa", "oracle"]] + ["retrieval-jepa"]]
    pairs += [(f"shuffled-jepa/{d}", f"prior/{d}") for d in ("greedy", "beam3")]     # fallen to the no-image level?
    for a, b in pairs + [("retrieval-jepa", f"retrieval-{n}") for n in enc_names[1:]]:
        if a not in res or b not in res:
            continue
        ok = [("all", m) for m in REPORT_METRICS if res[a][m] is not None and res[b][m] is not None]
        ok += [("all", f"f1:{n}") for n, e in res[a]["ce_per_label"].items() if e["f1"] is not None]
        vs.setdefault(a, {})[b] = E.compare(samples[a], samples[b], val(a), val(b), ok).get("all", {})
    examples = [{"row": int(te[i]), "id": data["ids"][te[i]], "reference": text[te[i]], "finding": f,
                 **{k: detokenize(hyps[f"{k}/beam3"][i]) for k in ("jepa", "random", "none", "oracle")
                    if f"{k}/beam3" in hyps},
                 **{k: detokenize(hyps[k][i]) for k in ("retrieval-jepa",) if k in hyps}}
                for i, f in pick_examples([text[t] for t in te])]
    config = {k: getattr(args, k) for k in ("report_section", "report_prefix", "report_grid", "report_width",
                                            "report_layers", "report_epochs", "report_lr", "report_max_len",
                                            "report_min_count", "report_dropout", "report_aux",
                                            "report_abnormal_weight", "report_select", "report_decoder",
                                            "report_head")}
    return {"systems": res, "vs": vs, "decoders": info, "examples": examples, "n_test": int(len(te)),
            "n_train": int(len(tr)), "vocab_size": len(vocab), "labels": list(LABELER_FINDINGS),
            "uncertain_policy": "U-ones (uncertain mentions count as positive)", "config": config}, examples


def pick_examples(refs, n_normal=1):
    """Test positions to show: for each finding, the first reference that states it (and no other finding, when
    one exists), then n_normal references with no finding. -> [(position, finding or "normal")]."""
    lab = [label_report(t) for t in refs]
    out = []
    for f in LABELER_FINDINGS:
        cands = [i for i, l in enumerate(lab) if l[f] and i not in {j for j, _ in out}]
        alone = [i for i in cands if sum(lab[i].values()) == 1]
        if cands:
            out.append(((alone or cands)[0], f))
    out += [(i, "normal") for i, l in enumerate(lab) if not any(l.values())][:n_normal]
    return out


HEADLINE = "beam3"                                          # the decoding the verdict and the examples use


def report_verdict(r):
    """The section's first paragraph: does the JEPA decoder write the findings, better than random init, than
    no image and than retrieval, and does it read the image at all (shuffled features, the oracle ceiling)."""
    s, vs = r["systems"], r["vs"]
    a = f"jepa/{HEADLINE}"
    if a not in s:
        return "**Verdict:** no JEPA decoder ran."

    def cmp(b, label):
        if b not in s:
            return None
        t = vs.get(a, {}).get(b, {}).get("ce_f1_macro")
        p = E.fmt_p(t) if t else "-"
        p = p if p.startswith("<") else "= " + p
        word = {"better": "significantly better than", "worse": "significantly worse than"}.get(
            (t or {}).get("verdict"), "not significantly different from")
        return f"{word} {label} ({E.fmt(s[b]['ce_f1_macro'])}, p {p})"
    ja = s[a]
    parts = [c for c in (cmp(f"random/{HEADLINE}", "random init"), cmp(f"none/{HEADLINE}", "no image (the decoder "
                                                                        "alone)"),
                         cmp(f"prior/{HEADLINE}", "no image under the same F1 rule (every finding stated for "
                                                  "every patient where that pays)"),
                         cmp("retrieval-jepa", "retrieval in JEPA space")) if c]
    text = (f"**Verdict:** the JEPA system reaches CE F1 macro "
            f"{E.fmt(ja['ce_f1_macro'], ja['ce_f1_macro_ci'])} (micro "
            f"{E.fmt(ja['ce_f1_micro'], ja['ce_f1_micro_ci'])}, beam 3): " + "; ".join(parts) + ".")
    sh = vs.get(a, {}).get(f"shuffled-jepa/{HEADLINE}", {}).get("ce_f1_macro")
    if sh:
        reads = sh.get("verdict") == "better"
        shuffled = s[f"shuffled-jepa/{HEADLINE}"]["ce_f1_macro"]
        text += (f" Given another test image it falls to {E.fmt(shuffled)} (p {E.fmt_p(sh)}): it "
                 + ("reads the image" if reads else "does not measurably read the image"))
        lvl = vs.get(f"shuffled-jepa/{HEADLINE}", {}).get(f"prior/{HEADLINE}", {}).get("ce_f1_macro")
        if lvl:
            text += {"better": ", though still above the no-image prior (p {p})",
                     "worse": ", below the no-image prior (p {p})"}.get(
                lvl.get("verdict"), ", to the no-image prior's level (p {p} for a difference)").format(p=E.fmt_p(lvl))
        text += "."
    if f"oracle/{HEADLINE}" in s:
        text += (f" Told the reference's findings (oracle) the same decoder reaches "
                 f"{E.fmt(s[f'oracle/{HEADLINE}']['ce_f1_macro'])}: the ceiling of what reading the image could give.")
    return text


def report_markdown(r):
    """The report.md section: verdict, main table, paired p-values, per-finding CE F1 with CIs and p-values,
    one example per finding and one normal."""
    c = r["config"]
    prefix = c.get("report_prefix", "grid")
    guided = c.get("report_decoder") == "guided"
    design = (f"findings head ({c['report_head']} probe) -> decoder {c['report_layers']}x{c['report_width']}"
              if guided else f"decoder {c['report_layers']}x{c['report_width']}, prefix "
              + (f"{c['report_grid']}x{c['report_grid']} pooled tokens" if prefix == "grid" else "all patch tokens"))
    L = ["", f"## Report generation ({r['n_train']} train / {r['n_test']} test reports, "
         f"{c['report_section']}; {design}, vocabulary {r['vocab_size']})", "", report_verdict(r), "",
         ("Systems: per encoder, a findings head on its frozen tokens says which findings the image has (each "
          "finding's threshold chosen for F1 on the val reports) and the oracle's decoder writes the report from "
          "them; " if guided else "Systems: a decoder per encoder on its frozen tokens; ")
         + "**none** (no image: the decoder alone, it writes the most typical report); "
         + ("**prior** (no image under the same F1 rule: a finding is stated for every patient when that scores a "
            "higher val F1 than never stating it); " if guided else "")
         + "**oracle** (the decoder given the labeler's findings of the reference: the ceiling); **shuffled-jepa** "
         "(the JEPA system given another test image: what is left when the image is not read); **retrieval** (the "
         "nearest train image's report). CE = clinical efficacy, the labeler's findings in generated vs reference "
         "text; " + r.get("uncertain_policy", "U-ones") + ".", "",
         "| system | decoding | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 [95% CI] | ROUGE-L [95% CI] | CE P / R "
         "micro | CE F1 micro [95% CI] | CE F1 macro [95% CI] |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, s in r["systems"].items():
        name, mode = (key.split("/") + ["-"])[:2]
        L.append(f"| {name} | {mode} | {s['bleu1']:.3f} | {s['bleu2']:.3f} | {s['bleu3']:.3f} | "
                 f"{E.fmt(s['bleu4'], s['bleu4_ci'])} | {E.fmt(s['rouge_l'], s['rouge_l_ci'])} | "
                 f"{E.fmt(s['ce_p_micro'])} / {E.fmt(s['ce_r_micro'])} | "
                 f"{E.fmt(s['ce_f1_micro'], s['ce_f1_micro_ci'])} | "
                 f"{E.fmt(s['ce_f1_macro'], s['ce_f1_macro_ci'])} |")
    keys = ["bleu4", "rouge_l", "ce_f1_micro", "ce_f1_macro"]
    L += ["", "Paired bootstrap p-values, jepa vs each (same decoding; ↑ jepa significantly better, ↓ "
          "worse):",
          "",
          "| jepa vs | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for a, row in r["vs"].items():
        for b, t in row.items():
            L.append(f"| {a} vs {b} | " + " | ".join(E.fmt_p(t.get(k)) for k in keys) + " |")
    shown = [k for k in (f"jepa/{HEADLINE}", f"random/{HEADLINE}", f"none/{HEADLINE}", f"prior/{HEADLINE}",
                         f"shuffled-jepa/{HEADLINE}",
                         f"oracle/{HEADLINE}", "retrieval-jepa", "retrieval-random") if k in r["systems"]]
    against = [k for k in shown[1:] if k in r["vs"].get(shown[0], {})] if shown and shown[0].startswith("jepa") \
        else []
    L += ["", f"Clinical-efficacy F1 per finding [95% CI] ({HEADLINE} for the decoders; n = positive references), "
          "and the paired p-value of jepa against each:", "",
          "| finding | n | " + " | ".join(shown) + " | " + " | ".join(f"p vs {k.split('/')[0]}" for k in against)
          + " |", "|---|---|" + "---|" * (len(shown) + len(against))]
    for lab in r["labels"]:
        e0 = r["systems"][shown[0]]["ce_per_label"][lab] if shown else {"n_ref": 0}
        if e0["n_ref"]:
            f1 = [E.fmt(r["systems"][k]["ce_per_label"][lab]["f1"], r["systems"][k]["ce_per_label"][lab].get("f1_ci"))
                  for k in shown]
            ps = [E.fmt_p(r["vs"][shown[0]][k].get(f"f1:{lab}")) for k in against]
            L.append(f"| {lab} | {e0['n_ref']} | " + " | ".join(f1 + ps) + " |")
    cols = [k for k in ("jepa", "random", "none", "retrieval-jepa") if any(k in e for e in r["examples"])]
    L += ["", f"Test examples ({HEADLINE}), one per finding and one normal, also in `report_examples.png`:", "",
          "| finding | image | reference | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    L += [f"| {e.get('finding', '-')} | {e['id']} | {e['reference']} | " + " | ".join(e.get(k, "-") for k in cols)
          + " |" for e in r["examples"]]
    return L


def draw_report_examples(images, examples, path, thumb=128, col=330, wrap=52):
    """One row per example: thumbnail, then the reference and the JEPA / random reports (wrapped)."""
    cols = ["reference", "jepa", "random"]
    rows = [[textwrap.wrap(e.get(c, "-"), wrap) for c in cols] for e in examples]
    heights = [max(thumb, 14 + 12 * max(len(t) for t in r)) + 8 for r in rows]
    canvas = Image.new("RGB", (thumb + 8 + col * len(cols), 18 + sum(heights)), "white")
    d = ImageDraw.Draw(canvas)
    for j, c in enumerate(cols):
        d.text((thumb + 8 + j * col, 3), c, fill=(0, 0, 0) if c == "reference" else E.COLORS[c])
    y = 18
    for e, r, h in zip(examples, rows, heights):
        canvas.paste(Image.fromarray(E.gray_rgb(images[e["row"]].numpy(), thumb).astype(np.uint8)), (0, y))
        for j, lines in enumerate(r):
            d.text((thumb + 8 + j * col, y), "\n".join(lines), fill="black", spacing=2)
        d.line([(0, y + h - 4), (canvas.width, y + h - 4)], fill=(200, 200, 200))
        y += h
    plumbing.save_png(path, canvas)


