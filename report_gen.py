"""
report_gen.py: report generation, eval.py's third task (--task report): the paper's LLaVA-style evaluation,
small enough for a CPU. eval.py reads and checks the data (reports.csv before any work), extracts the frozen
features and calls report_task; this file holds the second model (a small causal decoder behind a projector
for the image prefix), its text metrics and the labeler. It builds on eval.py's metrics, pooling and
statistics (the one import between them: eval.py imports this file only where it is used).

  frozen tokens [N, g*g, D] -> mean over each cell of a G x G grid (--report-grid, default 4: 16 prefix
  tokens) -> standardize (train statistics) -> 2-layer MLP projector -> prefix of a causal transformer decoder
  trained from scratch with teacher forcing on the train reports -> epoch with the lowest val loss kept ->
  test decoded once, greedy and beam search (width 3), capped at --report-max-len words.
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
alone learns the most typical report), and retrieval (the report of the nearest train image by cosine
similarity of the standardized mean-pooled tokens; "retrieval-jepa", and the same with each other encoder's
tokens, which compares the feature spaces with no training at all). CIs and p-values: eval.py's patient
bootstrap and paired test.
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

# The labeler's rules. A finding is mentioned where its pattern matches; a mention is cancelled by a negation
# cue in the same clause, before it ("no effusion", "without pneumothorax", "negative for pneumonia") or after
# it ("effusion has resolved", "pneumothorax is no longer seen"). Clauses end at . ; ! ? and at
# but/however/although/except, so "no effusion but a small pneumothorax" keeps the pneumothorax. Hedged
# mentions ("possible effusion") count as positive. Label = 1 if any mention survives, else 0 (negated and
# unmentioned are the same: "not reported").
LABELER_FINDINGS = {
    "Atelectasis": r"atelecta\w*",
    "Cardiomegaly": r"cardiomegaly|(?:heart|cardiac silhouette)(?: size)? (?:is|appears|remains) "
                    r"(?:\w+ly )?enlarged|enlarged (?:heart|cardiac silhouette)",
    "Consolidation": r"consolidat\w*",
    "Edema": r"o?edema",
    "Effusion": r"effusions?",
    "Nodule": r"nodul\w*|mass(?:es)?",
    "Pneumonia": r"pneumonias?",
    "Pneumothorax": r"pneumothora(?:x|ces)",
}
NEGATION_BEFORE = r"\b(?:no|not|without|negative for|free of|absence of|resolution of|resolved|clear of)\b"
NEGATION_AFTER = (r"\b(?:(?:has|have) (?:resolved|cleared)|(?:is|are) no longer "
                  r"(?:seen|present|visible|evident)|(?:is|are) not "
                  r"(?:seen|present|identified|visible|evident)|(?:has|have) been excluded|resolved)\b")
CLAUSE_END = r"[.;!?]|\b(?:but|however|although|except)\b"


def label_report(text, findings=LABELER_FINDINGS):
    """Report text -> {finding: 0/1} by the rules above."""
    out = dict.fromkeys(findings, 0)
    for clause in re.split(CLAUSE_END, text.lower()):
        for name, pattern in findings.items():
            for m in re.finditer(rf"\b(?:{pattern})\b", clause):
                negated = re.search(NEGATION_BEFORE, clause[:m.start()]) or \
                    re.search(NEGATION_AFTER, clause[m.end():])
                if not negated:
                    out[name] = 1
    return out


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


def report_statistics(hyps, refs, resamples):
    """Point values, bootstrap CIs and samples of every REPORT_METRICS entry, plus per-label CE F1 (point)."""
    stats = np.array([bleu_stats(h, r) for h, r in zip(hyps, refs)])
    rl = np.array([rouge_l(h, r) for h, r in zip(hyps, refs)])
    names = list(LABELER_FINDINGS)
    lab = lambda ts: np.array([[label_report(detokenize(t))[k] for k in names]  # noqa: E731
                               for t in ts], bool)
    pred, ref = lab(hyps), lab(refs)

    def metrics(idx):
        s = stats[idx].sum(0)
        return {**{f"bleu{n}": bleu_from_stats(s, n) for n in range(1, 5)}, "rouge_l": float(rl[idx].mean()),
                **clinical_efficacy(pred[idx], ref[idx])}
    point = metrics(np.arange(len(hyps)))
    boot = [metrics(idx) for idx in resamples]
    samples = {("all", k): np.array([np.nan if b[k] is None else b[k] for b in boot]) for k in REPORT_METRICS}
    out = {k: point[k] for k in REPORT_METRICS}
    out.update({k + "_ci": E.percentile_ci(samples[("all", k)]) for k in REPORT_METRICS})
    out["ce_per_label"] = {n: {"n_ref": int(ref[:, j].sum()), "n_pred": int(pred[:, j].sum()),
                               "f1": clinical_efficacy(pred[:, [j]], ref[:, [j]])["ce_f1_micro"]}
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
    """prefix features (B, P, F) -> projector Linear-GELU-Linear -> P prefix tokens, then <bos> w1 .. wn; a
    causal transformer predicts every next word. n_prefix = 0: the no-image baseline (the decoder alone)."""

    def __init__(self, feat_dim, n_prefix, vocab_size, width=256, layers=4, max_len=100, dropout=0.1):
        super().__init__()
        self.n_prefix = n_prefix
        self.proj = nn.Sequential(nn.Linear(feat_dim, width), nn.GELU(), nn.Linear(width, width)) \
            if n_prefix else None
        self.embed = nn.Embedding(vocab_size, width)
        # prefix, <bos>, words, <eos>
        self.pos = nn.Parameter(torch.randn(n_prefix + max_len + 2, width) * 0.02)
        self.blocks = nn.ModuleList(DecoderBlock(width, E.n_heads(width), dropout) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab_size)

    def step(self, x, start, caches=None):
        """x (B, T, W) at positions start.. -> logits (B, T, V) and the updated per-layer caches."""
        x = x + self.pos[start:start + x.shape[1]]
        new = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, None if caches is None else caches[i])
            new.append(kv)
        return self.head(self.norm(x)), new

    def start(self, prefix, words):
        """Prefix + words at once -> (logits of the word positions (B, L, V), caches)."""
        x = self.embed(words)
        if self.proj is not None:
            x = torch.cat([self.proj(prefix), x], 1)
        logits, caches = self.step(x, 0)
        return logits[:, self.n_prefix:], caches

    def forward(self, prefix, words):                  # teacher forcing: words = <bos> w1 .. wn <eos> <pad>..
        return self.start(prefix, words)[0]


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


def train_decoder(prefix, ids, vocab_size, tr, va, args, device, log, name):
    """Teacher forcing, AdamW + cosine schedule over --report-epochs; returns the model at the epoch with the
    lowest val loss (token-averaged cross-entropy), and that epoch and loss."""
    torch.manual_seed(args.seed)
    n_prefix, feat_dim = prefix.shape[1:] if prefix is not None else (0, 0)
    model = ReportDecoder(feat_dim, n_prefix, vocab_size, args.report_width, args.report_layers,
                          args.report_max_len, args.report_dropout).to(device)
    get = lambda rows: None if prefix is None else prefix[rows].to(device)  # noqa: E731

    def loss_of(rows):
        w = ids[rows, :int((ids[rows] != PAD).sum(1).max())].to(device)    # cut the batch's all-<pad> columns
        return F.cross_entropy(model(get(rows), w[:, :-1]).flatten(0, 1), w[:, 1:].flatten(),
                               ignore_index=PAD)
    opt = torch.optim.AdamW(model.parameters(), lr=args.report_lr, weight_decay=0.01)
    steps = args.report_epochs * math.ceil(len(tr) / args.batch_size)
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    g = torch.Generator().manual_seed(args.seed)
    best = (math.inf, 0, None)
    for epoch in tqdm(range(1, args.report_epochs + 1), desc=f"decoder {name}", leave=False):
        model.train()
        for idx in torch.randperm(len(tr), generator=g).split(args.batch_size):
            loss = loss_of(tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step(); sched.step()
        model.eval()
        with torch.no_grad():                                  # token-weighted mean over the val split
            n_tok = [(ids[va[i:i + 256], 1:] != PAD).sum().item() for i in range(0, len(va), 256)]
            val = sum(loss_of(va[i:i + 256]).item() * k
                      for i, k in zip(range(0, len(va), 256), n_tok)) / sum(n_tok)
        if val < best[0]:
            best = (val, epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    log(f"    decoder {name}: best val loss {best[0]:.4f} at epoch {best[1]} of {args.report_epochs}")
    return model, {"val_loss": best[0], "epoch": best[1]}


def nearest_train(tokens, tr, te):
    """Retrieval: each te row's nearest tr row (cosine similarity of standardized mean-pooled tokens)."""
    pooled = tokens.float().mean(1)
    mu, sd = E.standardizer(pooled[tr])
    z = F.normalize((pooled - mu) / sd, dim=1)
    return tr[(z[te] @ z[tr].T).argmax(1).numpy()]


def report_task(data, text, feats, enc_names, size, args, device, log):
    """text: the report of every dataset row ("" = none; eval.report_texts, checked before any feature was
    extracted). Trains and scores every system; returns (metrics["report"], examples for the pictures)."""
    has = np.array([bool(t) for t in text])
    tr, va, te = (np.flatnonzero((data["split"] == s) & has) for s in plumbing.SPLITS)
    counts = collections.Counter(w for i in tr for w in tokenize(text[i]))
    vocab = {w: i for i, w in enumerate(REPORT_SPECIALS + sorted(w for w, c in counts.items()
                                                                  if c >= args.report_min_count))}
    inv = {i: w for w, i in vocab.items()}
    ids = encode_reports(text, vocab, args.report_max_len)
    refs = [tokenize(text[i]) for i in te]
    pats = data["patients"][te]
    groups = [np.flatnonzero(pats == p) for p in dict.fromkeys(pats)]
    resamples = E.bootstrap_indices(groups, args.n_boot, args.seed)
    log(f"report: {len(tr)}/{len(va)}/{len(te)} train/val/test reports, vocabulary {len(vocab)} words "
        f"(min count {args.report_min_count}), section {args.report_section}, prefix {args.report_grid}x"
        f"{args.report_grid} tokens")
    trt, vat = torch.from_numpy(tr), torch.from_numpy(va)
    hyps, info = {}, {}
    for name in enc_names + ["none"]:
        if name == "none":
            prefix = None
        else:
            tok = feats[(name, size)]["tokens"]
            D = tok.shape[2]
            prefix = E.grid_pool(tok, args.report_grid).view(len(tok), D, -1).transpose(1, 2)   # (N, G*G, D)
            mu, sd = E.standardizer(prefix[tr])
            prefix = (prefix - mu) / sd
        t0 = time.time()
        model, info[name] = train_decoder(prefix, ids, len(vocab), trt, vat, args, device, log, name)
        for mode, k in (("greedy", 1), ("beam3", 3)):
            out = []
            for i in range(0, len(te), 128):
                rows = torch.from_numpy(te[i:i + 128])
                out += beam_search(model, None if prefix is None else prefix[rows], len(rows), k,
                                   args.report_max_len, device)
            hyps[f"{name}/{mode}"] = [[inv[j] for j in s] for s in out]
        info[name]["seconds"] = round(time.time() - t0, 1)
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
    val = lambda k: (lambda _, m: res[k][m])  # noqa: E731
    pairs = [(f"jepa/{d}", b) for d in ("greedy", "beam3") for b in
             [f"{n}/{d}" for n in enc_names[1:] + ["none"]] + ["retrieval-jepa"]]
    for a, b in pairs + [("retrieval-jepa", f"retrieval-{n}") for n in enc_names[1:]]:
        ok = [("all", m) for m in REPORT_METRICS if res[a][m] is not None and res[b][m] is not None]
        vs.setdefault(a, {})[b] = E.compare(samples[a], samples[b], val(a), val(b), ok).get("all", {})
    pick = [i for i in range(len(te)) if any(label_report(text[te[i]]).values())][:3]
    pick += [i for i in range(len(te)) if i not in pick][:6 - len(pick)]
    examples = [{"row": int(te[i]), "id": data["ids"][te[i]], "reference": text[te[i]],
                 **{k: detokenize(hyps[f"{k}/beam3"][i]) for k in ("jepa", "random") if f"{k}/beam3" in hyps}}
                for i in pick]
    config = {k: getattr(args, k) for k in ("report_section", "report_grid", "report_width", "report_layers",
                                            "report_epochs", "report_lr", "report_max_len",
                                            "report_min_count", "report_dropout")}
    return {"systems": res, "vs": vs, "decoders": info, "examples": examples, "n_test": int(len(te)),
            "n_train": int(len(tr)), "vocab_size": len(vocab), "labels": list(LABELER_FINDINGS),
            "config": config}, examples


def report_markdown(r):
    """The report.md section: main table, paired p-values, per-label CE F1, six examples."""
    c = r["config"]
    L = ["", f"## Report generation ({r['n_train']} train / {r['n_test']} test reports, "
         f"{c['report_section']}; decoder {c['report_layers']}x{c['report_width']}, prefix "
         f"{c['report_grid']}x{c['report_grid']} tokens, vocabulary {r['vocab_size']})", "",
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
    names = list(r["systems"])
    L += ["", "Clinical-efficacy F1 per finding (labeler on generated vs reference; n = positive "
          "references):",
          "",
          "| finding | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for lab in r["labels"]:
        e0 = r["systems"][names[0]]["ce_per_label"][lab]
        if e0["n_ref"]:
            f1 = [f"{r['systems'][k]['ce_per_label'][lab]['f1']:.2f}" for k in names]
            L.append(f"| {lab} | {e0['n_ref']} | " + " | ".join(f1) + " |")
    L += ["", "Test examples (beam 3), also in `report_examples.png`:", "",
          "| image | reference | jepa | random |", "|---|---|---|---|"]
    L += [f"| {e['id']} | {e['reference']} | {e.get('jepa', '-')} | {e.get('random', '-')} |"
          for e in r["examples"]]
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


