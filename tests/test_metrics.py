from __future__ import annotations

import math
import unicodedata

import pytest

from rag import metrics as m

# --- exact match and F1 (SQuAD v1.1 normalisation) ----------------------------------------------------


def test_normalize_answer_follows_squad():
    # lower -> drop punctuation -> drop articles -> collapse whitespace
    assert m.normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert m.normalize_answer("An apple a day") == "apple day"
    assert m.normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert m.normalize_answer("U.S.-led") == "usled"


def test_exact_match_is_a_maximum_over_answers():
    assert m.exact_match("the Denver Broncos!", ["Carolina", "Denver Broncos"]) == 1.0
    assert m.exact_match("Broncos", ["Denver Broncos"]) == 0.0


def test_token_f1_hand_computed():
    # pred {denver, broncos, team}, gold {denver, broncos}: 2 shared; P = 2/3, R = 2/2
    # F1 = 2 * (2/3) * 1 / (2/3 + 1) = 0.8; the other answer shares nothing, so the max is 0.8
    assert m.token_f1("Denver Broncos team", ["the Denver Broncos", "Carolina"]) == pytest.approx(0.8)
    # shared tokens are clipped counts: "b b b" vs "b c" share one b
    # P = 1/3, R = 1/2, F1 = 2 * (1/6) / (5/6) = 0.4
    assert m.token_f1("b b b", ["b c"]) == pytest.approx(0.4)
    assert m.token_f1("the", ["a"]) == 0.0  # both normalise to nothing: SQuAD v1.1 scores 0


# --- regex match and DPR's has_answer -------------------------------------------------------------------

HEIGHT = r"20\s?,?\s?(32|40)0\s?-?\s?f(ee|oo)t|6,?168\s*m"


def test_regex_match_searches_case_insensitively():
    assert m.regex_match("It is 20,320 feet tall", [HEIGHT]) == 1.0  # search, not match at the start
    assert m.regex_match("6168 M", [HEIGHT]) == 1.0  # IGNORECASE
    assert m.regex_match("6,194 meters", [HEIGHT]) == 0.0
    assert m.regex_match("CHINA", ["nope", "China"]) == 1.0
    assert m.regex_match("anything (", ["("]) == 0.0  # an invalid pattern matches nothing, as in DPR


def test_dpr_tokens_split_like_simple_tokenizer():
    # runs of letters/digits/marks are words; every other visible character is its own token
    assert m.dpr_tokens("U.S. won't-stop 3.5") == [
        "u",
        ".",
        "s",
        ".",
        "won",
        "'",
        "t",
        "-",
        "stop",
        "3",
        ".",
        "5",
    ]


def test_has_answer_matches_token_runs_not_substrings():
    text = "The first Nobel Prize in Physics was awarded in 1901 to Wilhelm Conrad Röntgen, of Germany."
    assert m.has_answer(["first nobel prize"], text)  # uncased
    assert m.has_answer(["Conrad Röntgen"], unicodedata.normalize("NFD", text))  # NFD on both sides
    assert not m.has_answer(["Conrad Rönt"], text)  # a partial word is not a token run
    assert not m.has_answer(["art"], "The party started.")  # substring of "party", not a token
    assert m.has_answer(["Röntgen ,"], text)  # punctuation is a token too
    assert m.has_answer([r"awarded in 19\d\d"], text, regex_answers=True)


def test_passage_hits_and_recall_at_k():
    passages = [["no", "Paris is here", "x"], ["a", "b", "c"], ["paris", "b", "c"]]
    hits = [m.passage_hits(["Paris"], p) for p in passages]
    assert hits == [[False, True, False], [False, False, False], [True, False, False]]
    # question 3 hits at rank 1, question 1 at rank 2, question 2 never: 1/3, 2/3, 2/3
    assert m.recall_at_k(hits, [1, 2, 3]) == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 2 / 3})
    with pytest.raises(ValueError, match="fewer than k"):
        m.recall_at_k(hits, [4])


def test_r_precision_follows_kilt():
    # gold {A, B}: R = 2; distinct retrieved A, C (A repeated is dropped): 1 of 2 -> 0.5
    # gold {C}: R = 1; first distinct retrieved is A -> 0.  Maximum over the sets: 0.5
    assert m.r_precision([{"A", "B"}, {"C"}], ["A", "A", "C", "B"]) == 0.5
    assert m.r_precision([{"B"}], [" B ", "A"]) == 1.0  # ids are compared stripped
    with pytest.raises(ValueError):
        m.r_precision([], ["A"])


def test_accuracy():
    assert m.accuracy(["SUPPORTS", "REFUTES", None], ["SUPPORTS", "SUPPORTS", "REFUTES"]) == pytest.approx(
        1 / 3
    )
    with pytest.raises(ValueError):
        m.accuracy(["a"], ["a", "b"])


# --- BLEU-1 and ROUGE-L ---------------------------------------------------------------------------------


def test_bleu1_hand_computed():
    # hyp: the cat is on the mat (6); ref: the cat sat on the mat (6)
    # clipped unigram matches: the 2, cat 1, on 1, mat 1 = 5 -> 5/6; equal lengths, no brevity penalty
    assert m.bleu1("the cat is on the mat", ["the cat sat on the mat"]) == pytest.approx(5 / 6)
    # hyp shorter than ref: precision 2/2 = 1, brevity penalty exp(1 - 6/2) = exp(-2)
    assert m.bleu1("the cat", ["the cat sat on the mat"]) == pytest.approx(math.exp(-2))
    # closest reference length (2) is used with several references: 1 * exp(0) = 1
    assert m.bleu1("the cat", ["the cat sat on the mat", "a cat"]) == pytest.approx(1.0)
    assert m.bleu1("dog", ["the cat"]) == 0.0  # no smoothing


def test_corpus_bleu1_hand_computed_and_against_nltk():
    hyps = ["the cat", "x y"]
    refs = [["the cat sat"], ["x y", "z"]]
    # matches 2 + 2 of 4 hypothesis words = 1; closest ref lengths 3 and 2: r = 5, c = 4
    # brevity penalty exp(1 - 5/4)
    assert m.corpus_bleu1(hyps, refs) == pytest.approx(math.exp(-0.25))
    from nltk.translate.bleu_score import corpus_bleu

    hyps = ["the quick brown fox jumps", "a b c d", "one two three"]
    refs = [["the fast brown fox jumped over"], ["a b x d", "a c"], ["one three two four"]]
    expected = corpus_bleu(
        [[r.split() for r in rs] for rs in refs], [h.split() for h in hyps], weights=(1.0,)
    )
    assert m.corpus_bleu1(hyps, refs) == pytest.approx(expected)


def test_rouge_l_hand_computed():
    # LCS(police killed the gunman, police kill the gunman) = police the gunman = 3; P = R = 3/4
    assert m.rouge_l("police killed the gunman", ["police kill the gunman"]) == pytest.approx(0.75)
    # LCS(the cat sat, the cat was sat) = 3: P = 3/3, R = 3/4, F = 2 * 0.75 / 1.75 = 6/7; max over refs
    assert m.rouge_l("the cat sat", ["x y", "the cat was sat"]) == pytest.approx(6 / 7)


def test_rouge_l_equals_rouge_score_package():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pred, ref = "a man is walking his dog in the park", "the man walked the dog through the park"
    assert m.rouge_l(pred, [ref]) == scorer.score(ref, pred)["rougeL"].fmeasure


# --- Q-BLEU ---------------------------------------------------------------------------------------------


def test_qbleu_components_follow_the_reference_word_classes():
    parts = m.qbleu_components("Who wrote the play Hamlet?")
    assert parts == {
        "imp": "wrote play",
        "ner": "Hamlet?",
        "qt": "Who",
        "sw": "the",
        "fluent": "Who wrote the play Hamlet?",
    }
    # what/which take the next word into the question type
    assert m.qbleu_components("Which river flows through Paris?")["qt"] == "Which river"


def test_qbleu_reproduces_the_reference_repositorys_test():
    # PrekshaNema25/Answerability-Metric tests/test_answerability_score.py: Bleu_3 fluency -> 0.678.
    # Hand: imp "great question" vs "good question": P = R = 1/2, F = 0.5; ner "is" vs "is": 1;
    # qt empty vs empty: 0 (the reference scores empty pairs 0); sw "is this a" both: 1.
    # answerability = 0.1 * 0.5 + 0.6 * 1 + 0.2 * 0 + 0.1 * 1 = 0.75
    # BLEU-3 = (4/5 * 2/4 * 1/3) ** (1/3) = 0.5109;  0.7 * 0.75 + 0.3 * 0.5109 = 0.678
    hyp, ref = "Is this a great question?", "Is this a good question?"
    assert m.qbleu(hyp, ref, n=3) == pytest.approx(0.7 * 0.75 + 0.3 * (4 / 5 * 2 / 4 * 1 / 3) ** (1 / 3))
    assert m.qbleu(hyp, ref, n=3) == pytest.approx(0.678, abs=5e-4)
    # Q-BLEU-1: BLEU-1 = 4/5 -> 0.7 * 0.75 + 0.3 * 0.8 = 0.765
    assert m.qbleu1(hyp, ref) == pytest.approx(0.765)


def test_qbleu1_hand_computed_with_entities_and_brevity():
    # hyp "Who wrote Hamlet?": imp [wrote], ner [hamlet], qt [who], sw []
    # ref "Who wrote the play Hamlet?": imp [wrote, play], ner [hamlet], qt [who], sw [the]
    # imp: P = 1/1 * exp(1 - 2/1) = e^-1 (brevity), R = 1/2 (no penalty): F = 2PR / (P + R)
    p, r = math.exp(-1), 0.5
    f_imp = 2 * p * r / (p + r)
    # ner and qt equal: F = 1; sw: empty hypothesis -> 0
    answerability = 0.1 * f_imp + 0.6 * 1 + 0.2 * 1 + 0.1 * 0
    # fluency BLEU-1: [who wrote hamlet] vs [who wrote the play hamlet]: 3/3 * exp(1 - 5/3)
    fluent = math.exp(1 - 5 / 3)
    expected = 0.7 * answerability + 0.3 * fluent
    assert m.qbleu1("Who wrote Hamlet?", "Who wrote the play Hamlet?") == pytest.approx(expected)


def test_qbleu1_of_identical_questions():
    # every component equal and non-empty: F = 1 each -> answerability 1, fluency 1 -> 1
    assert m.qbleu1("Who wrote the play Hamlet?", "Who wrote the play Hamlet?") == pytest.approx(1.0)
    # a question with no question word has an empty qt component, which scores 0 (weight 0.2):
    # 0.7 * (1 - 0.2) + 0.3 * 1 = 0.86
    same = "Galileo was under house arrest for this man's theory"
    assert m.qbleu1(same, same) == pytest.approx(0.86)


def test_coco_sentence_bleu_zero_guards():
    assert m.coco_sentence_bleu([], [], 1) == 0.0
    assert m.coco_sentence_bleu(["a"], ["a"], 1) == pytest.approx(1.0)


# --- aggregates -----------------------------------------------------------------------------------------


def test_score_qa():
    scores = m.score_qa(
        ["Denver Broncos team", "Carolina Panthers"], [["Denver Broncos"], ["Carolina Panthers"]]
    )
    # EM: 0 and 1 -> 0.5; F1: 0.8 (as above) and 1 -> 0.9
    assert scores == m.QAScores(n=2, exact_match=0.5, f1=pytest.approx(0.9))
    regex_scores = m.score_qa(["20,320 feet", "no"], [[HEIGHT], [HEIGHT]], regex_answers=True)
    assert regex_scores == m.QAScores(n=2, exact_match=0.5, f1=None)
    with pytest.raises(ValueError):
        m.score_qa(["a"], [])


def test_score_generation():
    preds = ["the cat is on the mat", "police killed the gunman"]
    refs = [["the cat sat on the mat"], ["police kill the gunman"]]
    scores = m.score_generation(preds, refs, question_generation=True)
    # corpus BLEU-1: (5 + 3) / (6 + 4), lengths equal; ROUGE-L mean of 5/6 (LCS 5 of 6) and 0.75
    assert scores.n == 2
    assert scores.bleu1 == pytest.approx(8 / 10)
    assert scores.rouge_l == pytest.approx((5 / 6 + 0.75) / 2)
    assert scores.qbleu1 == pytest.approx(
        (m.qbleu1(preds[0], refs[0][0]) + m.qbleu1(preds[1], refs[1][0])) / 2
    )
    assert m.score_generation(preds, refs).qbleu1 is None


def test_score_classification_and_retrieval():
    scores = m.score_classification(["SUPPORTS", None, "REFUTES"], ["SUPPORTS", "REFUTES", "SUPPORTS"])
    assert scores == m.ClassificationScores(n=3, accuracy=pytest.approx(1 / 3), unparsed=1)
    hits = [[False, True], [True, False]]
    retrieval = m.score_retrieval(
        hits, [1, 2], gold_sets=[[{"A"}], None], retrieved_pages=[["B", "A"], ["C", "D"]]
    )
    # recall@1 = 1/2, recall@2 = 1; R-precision only for question 1: R = 1, first page B -> 0
    assert retrieval == m.RetrievalScores(n=2, recall={1: 0.5, 2: 1.0}, r_precision=0.0, n_with_provenance=1)


def test_grounded_share_counts_distinct_content_words_found_in_the_passages():
    assert m.content_words("This 16th-century man's theory, the one of Galileo!") == {
        "16th", "century", "man", "theory", "one", "galileo"}  # fmt: skip
    passages = ["Galileo Galilei. An astronomer of the 16th century.", "Theory of heliocentrism."]
    # found: galileo, 16th, century, theory; not found: man, one -> 4 of 6
    assert m.grounded_share("This 16th-century man's theory, the one of Galileo!", passages) == pytest.approx(4 / 6)
    assert m.grounded_share("the of and", passages) is None  # no content word
    assert m.grounded_share("Galileo", []) == 0.0
