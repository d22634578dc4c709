"""Every metric of the paper's tables, once. All scores are fractions in [0, 1].

- exact match and token F1: the SQuAD v1.1 evaluation script's normalisation (lower case, drop
  punctuation, drop the articles a/an/the, collapse whitespace), maximum over the gold answers;
- regex match (CuratedTrec) and retrieval hits: DPR's `has_answer` / `regex_match`
  (dpr/data/qa_validation.py): NFD-normalised text, `regex` with IGNORECASE|UNICODE|MULTILINE and
  `search`; string answers match as a run of DPR SimpleTokenizer tokens, uncased;
- BLEU-1: sacrebleu's BLEU with max_ngram_order=1, its default 13a tokenisation, case-sensitive, no
  smoothing (a hypothesis with no matching word scores 0); corpus-level for aggregates;
- ROUGE-L: the rouge-score package's rougeL F-measure (no stemming), maximum over references;
- Q-BLEU-1 (Nema & Khapra 2018): as github.com/PrekshaNema25/Answerability-Metric computes it;
- KILT R-precision: as kilt/eval_retrieval.py computes it (maximum over the gold evidence sets);
- grounded share: the share of generated content words found in the retrieved passages (a factuality
  proxy, ours: the paper judges factuality by hand).
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import regex

# ---------------------------------------------------------------------------------------------------
# Exact match and F1 (SQuAD v1.1 evaluate script).


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """An empty gold answer matches nothing (not even an empty prediction): it names no answer."""
    target = normalize_answer(prediction)
    return float(any(target == normalize_answer(a) for a in answers if a.strip()))


def _f1(prediction_tokens: list[str], answer_tokens: list[str]) -> float:
    common = Counter(prediction_tokens) & Counter(answer_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction_tokens), same / len(answer_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    tokens = normalize_answer(prediction).split()
    return max((_f1(tokens, normalize_answer(a).split()) for a in answers), default=0.0)


# ---------------------------------------------------------------------------------------------------
# DPR answer matching: regex match, has_answer.

_DPR_TOKEN = regex.compile(
    r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])", flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE
)
_REGEX_FLAGS = regex.IGNORECASE | regex.UNICODE | regex.MULTILINE


def dpr_tokens(text: str) -> list[str]:
    """DPR's SimpleTokenizer words, uncased: runs of letters/digits/marks, or single other characters."""
    return [m.group().lower() for m in _DPR_TOKEN.finditer(text)]


def _regex_found(text: str, pattern: str) -> bool:
    try:
        compiled = regex.compile(pattern, flags=_REGEX_FLAGS)
    except regex.error:
        return False  # DPR counts an invalid pattern as no match
    return compiled.search(text) is not None


def has_answer(answers: Sequence[str], text: str, *, regex_answers: bool = False) -> bool:
    """DPR's has_answer: does `text` contain any answer (as a token run, or a regex search hit)?"""
    text = unicodedata.normalize("NFD", text)
    if regex_answers:
        return any(_regex_found(text, unicodedata.normalize("NFD", a)) for a in answers if a.strip())
    words = dpr_tokens(text)
    for answer in answers:
        needle = dpr_tokens(unicodedata.normalize("NFD", answer))
        if not needle:  # an empty (or punctuation-free blank) answer names nothing: it is in no text
            continue
        for i in range(len(words) - len(needle) + 1):
            if words[i : i + len(needle)] == needle:
                return True
    return False


def regex_match(prediction: str, patterns: Sequence[str]) -> float:
    """CuratedTrec's answer check: any pattern found (re.search, DPR's flags) in the prediction."""
    return float(has_answer(patterns, prediction, regex_answers=True))


# ---------------------------------------------------------------------------------------------------
# BLEU-1 and ROUGE-L through their reference libraries.


def _bleu1_metric():
    from sacrebleu.metrics import BLEU

    return BLEU(max_ngram_order=1, smooth_method="none", effective_order=True)


def bleu1(prediction: str, references: Sequence[str]) -> float:
    """Sentence BLEU-1 (sacrebleu), against all references (closest reference length)."""
    return _bleu1_metric().sentence_score(prediction, list(references)).score / 100.0


def corpus_bleu1(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-1 (sacrebleu): clipped unigram counts and lengths summed over the corpus."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    width = max((len(r) for r in references), default=0)
    # sacrebleu takes reference streams; None pads examples with fewer references
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]
    return _bleu1_metric().corpus_score(list(predictions), streams).score / 100.0


def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, references: Sequence[str], scorer=None) -> float:
    """ROUGE-L F-measure (rouge-score), maximum over references."""
    scorer = scorer or _rouge_scorer()
    return scorer.score_multi(list(references), prediction)["rougeL"].fmeasure


# ---------------------------------------------------------------------------------------------------
# Accuracy, recall@k, R-precision.


def accuracy(predictions: Sequence[str | None], labels: Sequence[str]) -> float:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("accuracy of no examples")
    return sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels)


def passage_hits(
    answers: Sequence[str], passages: Sequence[str], *, regex_answers: bool = False
) -> list[bool]:
    """For each ranked passage text, whether it contains an answer (DPR's has_answer). DPR checks the
    passage text alone; prepend the title (DPR's use_title: `title + " . " + text`) to count it too."""
    return [has_answer(answers, text, regex_answers=regex_answers) for text in passages]


def recall_at_k(hits: Sequence[Sequence[bool]], ks: Sequence[int]) -> dict[int, float]:
    """Fraction of questions with an answer-bearing passage among their top k, for each k."""
    if not hits:
        raise ValueError("recall@k of no questions")
    for k in ks:
        short = [i for i, h in enumerate(hits) if len(h) < k]
        if k < 1 or short:
            raise ValueError(f"recall@{k}: question {short[:1]} has fewer than k ranked passages")
    return {k: sum(any(h[:k]) for h in hits) / len(hits) for k in ks}


def ranking_agreement(reference: Sequence[Sequence[int]], rows: Sequence[Sequence[int]]) -> tuple[float, float]:
    """How far a ranking keeps a reference one (e.g. bfloat16 d(z) against float32): (mean overlap of the
    top-k sets, share of queries with the same top-1). reference, rows: (B, k) row ids, best first."""
    _check_lengths(reference, rows, "rankings")
    if not len(reference):
        raise ValueError("ranking_agreement: no queries")
    overlap = [len(set(a) & set(b)) / len(a) for a, b in zip(reference, rows, strict=True)]
    top1 = [a[0] == b[0] for a, b in zip(reference, rows, strict=True)]
    return sum(overlap) / len(overlap), sum(top1) / len(top1)


def r_precision(gold_sets: Sequence[Collection[str]], retrieved: Sequence[str]) -> float:
    """KILT R-precision: for each gold evidence set of size R, the share of it among the first R
    distinct retrieved pages; the maximum over the sets."""
    sets = [{str(g).strip() for g in s} for s in gold_sets if s]
    if not sets:
        raise ValueError("R-precision needs at least one non-empty gold evidence set")
    best = 0.0
    for gold in sets:
        distinct = list(dict.fromkeys(str(p).strip() for p in retrieved))[: len(gold)]
        best = max(best, sum(p in gold for p in distinct) / len(gold))
    return best


# ---------------------------------------------------------------------------------------------------
# Q-BLEU (Nema & Khapra 2018), after PrekshaNema25/Answerability-Metric's answerability_score.py:
#   Q = delta * answerability + (1 - delta) * BLEU-n,
#   answerability = re * F(relevant words) + ner * F(named entities) + qt * F(question words)
#                   + (1 - re - ner - qt) * F(function words),
# each F the harmonic mean of coco-caption sentence BLEU-1 in both directions, on PTB-tokenised,
# lower-cased text without punctuation tokens. The word classes are found on the raw text (case
# matters: a capitalised word is a named entity). Java's Stanford PTBTokenizer is replaced by NLTK's
# Treebank port; the reference's quirks are kept (e.g. two empty components score 0, not 1).

QBLEU_STOP_WORDS = frozenset(
    "did have ourselves hers between yourself but again there about once during out very having with "
    "they own an be some for do its yours such into of most itself other off is s am or as from him "
    "each the themselves until below are we these your his through don nor me were her more himself "
    "this down should our their while above both up to ours had she all no at any before them same "
    "and been in will on does yourselves then that because over so can not now under he you herself "
    "has just too only myself those i after few t being if theirs my against a by doing it further "
    "was here than".split()
)
_QUESTION_WORDS = ("What", "Which", "Why", "Who", "Whom", "Whose", "Where", "When", "How")
QBLEU_QUESTION_WORDS = frozenset(_QUESTION_WORDS + tuple(w.lower() for w in _QUESTION_WORDS))
_PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)


@dataclass(frozen=True)
class QBleuWeights:
    """The reference README's weights for SQuAD-style questions (function words get the rest: 0.1)."""

    ner: float = 0.6
    qt: float = 0.2
    re: float = 0.1
    delta: float = 0.7


def _question_type_words(words: list[str]) -> list[str]:
    found = []
    for word in QBLEU_QUESTION_WORDS:
        for i, w in enumerate(words):
            if w == word:
                found.append(w)
                # after what/which comes the answer type ("which river"), part of the question type
                if i + 1 < len(words) and w.lower() in ("what", "which"):
                    found.append(words[i + 1])
    return found


def qbleu_components(question: str) -> dict[str, str]:
    """The five views of a question the metric compares: imp, ner, qt, sw and the question itself."""
    words = question.split()
    qt = _question_type_words(words)
    imp = [w for w in words if w not in qt and not w[0].isupper() and w not in QBLEU_STOP_WORDS]
    ner_words = words[1:] if words and words[0].lower() in QBLEU_QUESTION_WORDS else words
    return {
        "imp": " ".join(imp),
        "ner": " ".join(w for w in ner_words if w[0].isupper()),
        "qt": " ".join(qt),
        "sw": " ".join(w.lower() for w in words if w.lower() in QBLEU_STOP_WORDS),
        "fluent": question,
    }


def _ptb_tokens(text: str) -> list[str]:
    from nltk.tokenize import TreebankWordTokenizer

    tokens = TreebankWordTokenizer().tokenize(text.lower(), convert_parentheses=True)
    return [t for t in tokens if t not in _PTB_PUNCTUATION and t.upper() not in _PTB_PUNCTUATION]


def coco_sentence_bleu(hypothesis: list[str], reference: list[str], n: int) -> float:
    """coco-caption's per-sentence BLEU-n for one reference, with its tiny/small zero guards."""
    tiny, small = 1e-15, 1e-9
    product = 1.0
    for k in range(1, n + 1):
        hyp = Counter(tuple(hypothesis[i : i + k]) for i in range(len(hypothesis) - k + 1))
        ref = Counter(tuple(reference[i : i + k]) for i in range(len(reference) - k + 1))
        correct = sum(min(c, ref[g]) for g, c in hyp.items())
        product *= (correct + tiny) / (max(0, len(hypothesis) - k + 1) + small)
    score = product ** (1.0 / n)
    ratio = (len(hypothesis) + tiny) / (len(reference) + small)
    return score * math.exp(1 - 1 / ratio) if ratio < 1 else score


def _two_way_f(hypothesis: list[str], reference: list[str]) -> float:
    precision = coco_sentence_bleu(hypothesis, reference, 1)
    recall = coco_sentence_bleu(reference, hypothesis, 1)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def qbleu(prediction: str, reference: str, weights: QBleuWeights = QBleuWeights(), n: int = 1) -> float:
    """Q-BLEU-n of one generated question against its reference (Q-BLEU-1 with n=1)."""
    hyp, ref = qbleu_components(prediction), qbleu_components(reference)
    f = {key: _two_way_f(_ptb_tokens(hyp[key]), _ptb_tokens(ref[key])) for key in ("imp", "ner", "qt", "sw")}
    function_weight = 1 - weights.re - weights.ner - weights.qt
    answerability = (
        weights.re * f["imp"] + weights.ner * f["ner"] + weights.qt * f["qt"] + function_weight * f["sw"]
    )
    fluent = coco_sentence_bleu(_ptb_tokens(hyp["fluent"]), _ptb_tokens(ref["fluent"]), n)
    return weights.delta * answerability + (1 - weights.delta) * fluent


def qbleu1(prediction: str, reference: str, weights: QBleuWeights = QBleuWeights()) -> float:
    return qbleu(prediction, reference, weights, n=1)


# ---------------------------------------------------------------------------------------------------
# Grounding: a factuality proxy for generated text (the paper's Jeopardy finding, measured by word overlap).


def content_words(text: str) -> set[str]:
    """The distinct content words of `text`: DPR tokens, lower-cased, that hold a letter or digit and are
    not English function words (Q-BLEU's stop-word list)."""
    return {w for w in dpr_tokens(text) if any(c.isalnum() for c in w) and w not in QBLEU_STOP_WORDS}


def grounded_share(generated: str, passages: Sequence[str]) -> float | None:
    """The share of the generated text's content words that occur in the passages (title and text as
    given): how much of what was written the evidence states. None when the text has no content word."""
    words = content_words(generated)
    if not words:
        return None
    found = set().union(*(content_words(p) for p in passages)) if passages else set()
    return len(words & found) / len(words)


# ---------------------------------------------------------------------------------------------------
# Corpus-level aggregates.


@dataclass(frozen=True)
class QAScores:
    n: int
    exact_match: float  # regex match for regex answers
    f1: float | None  # None for regex answers (F1 has no meaning against a pattern)


@dataclass(frozen=True)
class GenerationScores:
    n: int
    bleu1: float  # corpus-level, sacrebleu
    rouge_l: float  # mean sentence F-measure, rouge-score
    qbleu1: float | None  # mean sentence Q-BLEU-1 (question generation only)


@dataclass(frozen=True)
class ClassificationScores:
    n: int
    accuracy: float
    unparsed: int  # predictions that named no label


@dataclass(frozen=True)
class RetrievalScores:
    n: int
    recall: dict[int, float]  # k -> recall@k
    r_precision: float | None  # mean over the examples with provenance
    n_with_provenance: int


def _check_lengths(a: Sequence[object], b: Sequence[object], what: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions but {len(b)} {what}")
    if not a:
        raise ValueError("no examples to score")


def score_qa(
    predictions: Sequence[str], answers: Sequence[Sequence[str]], *, regex_answers: bool = False
) -> QAScores:
    _check_lengths(predictions, answers, "answer lists")
    pairs = list(zip(predictions, answers, strict=True))
    if regex_answers:
        return QAScores(len(pairs), sum(regex_match(p, a) for p, a in pairs) / len(pairs), None)
    em = sum(exact_match(p, a) for p, a in pairs) / len(pairs)
    return QAScores(len(pairs), em, sum(token_f1(p, a) for p, a in pairs) / len(pairs))


def score_generation(
    predictions: Sequence[str], references: Sequence[Sequence[str]], *, question_generation: bool = False
) -> GenerationScores:
    _check_lengths(predictions, references, "reference lists")
    scorer = _rouge_scorer()
    rouge = sum(rouge_l(p, r, scorer) for p, r in zip(predictions, references, strict=True)) / len(
        predictions
    )
    q = None
    if question_generation:
        q = sum(qbleu1(p, r[0]) for p, r in zip(predictions, references, strict=True)) / len(predictions)
    return GenerationScores(len(predictions), corpus_bleu1(predictions, references), rouge, q)


def score_classification(predictions: Sequence[str | None], labels: Sequence[str]) -> ClassificationScores:
    _check_lengths(predictions, labels, "labels")
    return ClassificationScores(
        len(labels), accuracy(predictions, labels), sum(p is None for p in predictions)
    )


def score_retrieval(
    hits: Sequence[Sequence[bool]],
    ks: Sequence[int],
    *,
    gold_sets: Sequence[Sequence[Collection[str]] | None] | None = None,
    retrieved_pages: Sequence[Sequence[str]] | None = None,
) -> RetrievalScores:
    """recall@k from per-question passage hits; R-precision where gold evidence sets are given."""
    recall = recall_at_k(hits, ks)
    if gold_sets is None or retrieved_pages is None:
        return RetrievalScores(len(hits), recall, None, 0)
    _check_lengths(retrieved_pages, gold_sets, "gold evidence lists")
    scored = [r_precision(g, r) for g, r in zip(gold_sets, retrieved_pages, strict=True) if g and any(g)]
    mean = sum(scored) / len(scored) if scored else None
    return RetrievalScores(len(hits), recall, mean, len(scored))
