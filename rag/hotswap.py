"""Knowledge hot-swap (the paper's sec 4.5): replace the index under a loaded model, no retraining.

Two parts:
- `swap_index(model, knowledge)`: a new RagModel that shares the query encoder and generator of
  `model` (same modules, same weights) but retrieves from another knowledge base. Configs and models
  are never mutated; the swapped model is a new object.
- The built-in experiment: the default Wikipedia summaries (facts A) and a copy in which the capitals
  of a few dozen countries are permuted among themselves, consistently in every passage that names
  them (facts B). Questions are Red-Trivia's "What is the capital of X?" for those countries. The
  2x2 table (index A/B x facts A/B, % of answers that name each version's capital) shows the answers
  follow the index that is plugged in.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from rag.config import DecodingConfig
from rag.corpus import Passage
from rag.decoding import generate as decoding_generate
from rag.tasks import Example

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from rag.model import RagModel
    from rag.retriever import Retriever

CAPITAL_QUESTION = re.compile(r"What is the capital of (.+)\?")


@dataclass(frozen=True)
class ChangedFact:
    """One fact that differs between the two knowledge bases."""

    subject: str  # the country (capitals) or the city (city-country): a summary title
    question: str
    fact_a: str  # the capital (country) in the original summaries
    fact_b: str  # the capital (country) the modified copy gives it
    # None: fact A is replaced in every passage (a capital is renamed consistently everywhere); else only
    # in the passages of the summary with this title (a city moved to another country in its own article)
    scope: str | None = None


def _word(name: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(name) + r"(?!\w)")


def capital_facts(
    summaries: Mapping[str, Mapping[str, str]], questions: Sequence[Example], limit: int = 40
) -> list[ChangedFact]:
    """Pick countries whose summary names their capital, and give each another country's capital.

    A country qualifies when the question is "What is the capital of X?", X has a summary whose text
    names the capital (the first listed answer), the capital is not X's own name, and at most one other
    summary (usually the city's own article) names the capital, so the rewrite touches few passages.
    The chosen capitals are permuted by a cyclic shift: every fact B is a real capital (plausible) and
    differs from fact A; the permutation keeps city names unique in the modified copy.
    """
    texts = {title: entry["extract"] for title, entry in summaries.items()}
    chosen: list[tuple[str, str, str]] = []
    for example in questions:
        match = CAPITAL_QUESTION.fullmatch(example.input)
        if match is None or match.group(1) not in texts:
            continue
        country, capital = match.group(1), example.answers[0]
        pattern = _word(capital)
        if capital == country or not pattern.search(texts[country]):
            continue
        if sum(1 for title, text in texts.items() if title != country and pattern.search(text)) > 1:
            continue
        chosen.append((country, example.input, capital))
        if len(chosen) == limit:
            break
    if len(chosen) < 2:
        raise ValueError(f"only {len(chosen)} capital question(s) qualify; need at least 2 to permute")
    capitals = [capital for _, _, capital in chosen]
    facts = [
        ChangedFact(country, question, capital, capitals[(i + 1) % len(capitals)])
        for i, (country, question, capital) in enumerate(chosen)
    ]
    # a fact B already named in the country's original text would make "matches B" ambiguous
    return [f for f in facts if not _word(f.fact_b).search(texts[f.subject])]


CITY_COUNTRY = re.compile(r"\bis (?:a|an|the) (?:[a-z-]+ ){0,3}(?:city|town|port|municipality|capital)(?: and [a-z ]+)? "
                          r"(?:in|of) (?:the )?(?:[a-z-]+ ){0,2}([A-Z][a-z]+(?: [A-Z][a-z]+)*)")  # fmt: skip


def city_country_facts(summaries: Mapping[str, Mapping[str, str]], countries: Sequence[str],
                       limit: int = 40) -> list[ChangedFact]:  # fmt: skip
    """The second relation: "In which country is X?" for cities whose summary says "X is a city in C".

    C must be one of `countries` (Red-Trivia's world-capitals countries, all summary titles) and the
    first country the summary names. Facts B permute the chosen countries cyclically, as capital_facts
    does, but the rewrite is scoped to the city's own summary: the city moves to another country in its
    article, while the countries' own articles stay as they are."""
    known = set(countries)
    chosen: list[tuple[str, str]] = []
    for title, entry in summaries.items():
        match = CITY_COUNTRY.search(entry["extract"])
        if match is None or match.group(1) not in known or title in known or "(" in title or "," in title:
            continue
        chosen.append((title, match.group(1)))
        if len(chosen) == limit:
            break
    if len(chosen) < 2:
        raise ValueError(f"only {len(chosen)} city-country fact(s) qualify; need at least 2 to permute")
    facts = []
    for i, (city, country) in enumerate(chosen):
        other = next(c for _, c in chosen[i + 1 :] + chosen[:i] if c != country) if len({c for _, c in chosen}) > 1 else None
        if other is not None and not _word(other).search(summaries[city]["extract"]):
            facts.append(ChangedFact(city, f"In which country is {city}?", country, other, scope=city))
    return facts


def rewrite_text(text: str, facts: Sequence[ChangedFact]) -> str:
    """Replace every capital of `facts` by its fact B in one pass (a permutation cannot chain)."""
    if not facts:
        return text
    mapping = {f.fact_a: f.fact_b for f in facts}
    names = sorted(mapping, key=len, reverse=True)  # longest first: "Kuwait City" before "Kuwait"
    pattern = re.compile(r"(?<!\w)(" + "|".join(re.escape(n) for n in names) + r")(?!\w)")
    return pattern.sub(lambda m: mapping[m.group(1)], text)


def rewrite_summaries(
    summaries: Mapping[str, Mapping[str, str]], facts: Sequence[ChangedFact]
) -> dict[str, dict[str, str]]:
    """A copy of the summaries where the facts' capitals are permuted in every title and text."""
    out: dict[str, dict[str, str]] = {}
    for key, entry in summaries.items():
        new = dict(entry)
        new["title"] = rewrite_text(entry.get("title", key), facts)
        new["extract"] = rewrite_text(entry["extract"], facts)
        out[key] = new
    return out


# ------------------------------------------------------------------------------ swapping the index


def swap_index(model: RagModel, knowledge: Path | str | Retriever) -> RagModel:
    """A RagModel that retrieves from `knowledge` (a knowledge base folder or a Retriever) and shares
    everything else with `model`: the same query encoder and generator modules, kind and k. The
    knowledge base must have been encoded by a passage encoder that matches the query encoder's space
    (the paper swaps indexes built with the same d(z)); its dimension is checked."""
    from rag.model import RagModel
    from rag.retriever import Retriever

    if not isinstance(knowledge, Retriever):
        knowledge = Retriever.open(knowledge, query_encoder=model.query_encoder)
    elif knowledge.query_encoder is not model.query_encoder:
        knowledge = Retriever(knowledge.index, knowledge.passages, model.query_encoder)
    return RagModel(model.query_encoder, knowledge, model.generator, model.kind, model.k)


def refresh(model: RagModel) -> RagModel:
    """`model` if its knowledge base is unchanged on disk, else a model over the newest data version
    (rag.updates: passages added, replaced or deleted since it was opened) that shares the query
    encoder and generator with `model`: the hot-swap, for a knowledge base that changed in place."""
    from rag.io import read_format_json
    from rag.knowledge import FORMAT, META_FILE, data_version
    from rag.manifest import IntegrityError
    from rag.retriever import Retriever

    source = getattr(model.retriever, "source", None)
    if source is None:
        return model  # a retriever made in memory: nothing on disk to follow
    meta = read_format_json(source.path, META_FILE, FORMAT, "knowledge base (rag index build)")
    if data_version(meta) == source.version:
        return model
    try:
        retriever = Retriever.open(source.path, query_encoder=model.query_encoder, ray=source.ray)
    except IntegrityError as error:  # an update between its meta.json switch and its manifest (rag.updates)
        log.warning("%s: data version %s not taken up yet, still answering from version %s: %s",
                    source.path, data_version(meta), source.version, error)  # fmt: skip
        return model
    return swap_index(model, retriever)


def derive_knowledge_base(
    base_dir: Path | str, facts: Sequence[ChangedFact], out_dir: Path | str, device: str = "cpu"
) -> Path:
    """A copy of the knowledge base `base_dir` whose passages state facts B instead of facts A.

    Passages are rewritten in place (rewrite_text); only those that changed are re-encoded with the
    base's own passage encoder d(z), the others keep their stored vectors, so the copy equals a full
    rebuild of the rewritten passages. Changed passages get the id suffix "~b". Written atomically in
    the knowledge base layout (rag.knowledge), so Retriever.open and `rag eval --index` read it.
    """
    from rag.encoders import load_encoder, passage_text
    from rag.knowledge import encoder_config, open_knowledge_base, write_knowledge_base

    base = open_knowledge_base(base_dir)
    rows = np.arange(len(base.passages))
    passages, changed = [], []
    for row, p in zip(rows.tolist(), base.passages.get(rows), strict=True):
        here = [f for f in facts if f.scope is None or f.scope == p.title]  # scoped facts: their article only
        title, text = rewrite_text(p.title, here), rewrite_text(p.text, here)
        if (title, text) != (p.title, p.text):
            changed.append(row)
            p = Passage(p.id + "~b", title, text)
        passages.append(p)
    vectors = base.index.embeddings(rows).astype(np.float32)  # (N, D)
    if changed:
        d_z = load_encoder(encoder_config(base.meta), device)
        vectors[changed] = d_z.encode([passage_text(passages[r].title, passages[r].text) for r in changed])
    meta = dict(base.meta, fingerprint=f"{base.meta['fingerprint']}+facts-b", derived_from=str(base_dir),
                changed_passages=len(changed), changed_facts=[dataclasses.asdict(f) for f in facts])
    return write_knowledge_base(passages, vectors, meta, out_dir)


# ------------------------------------------------------------------------------ the 2x2 experiment


@dataclass(frozen=True)
class HotSwapResult:
    facts: list[ChangedFact]
    answers: dict[str, list[str]]  # index name ("A", "B"; "none": closed-book) -> each question's answer
    table: dict[str, dict[str, float]]  # index name -> facts name -> fraction of answers naming that fact
    top_passage: dict[str, dict[str, float]]  # the same for the top retrieved passage (retrieval alone)
    seconds: float


def _matches(texts: Sequence[str], facts: Sequence[ChangedFact], which: str) -> float:
    from rag.metrics import has_answer

    names = [f.fact_a if which == "A" else f.fact_b for f in facts]
    return sum(has_answer([n], t) for n, t in zip(names, texts, strict=True)) / len(facts)


def run_hotswap(
    model: RagModel, indexes: Mapping[str, Path | str], facts: Sequence[ChangedFact],
    decoding: DecodingConfig, batch_size: int = 8,
) -> HotSwapResult:
    """Ask every fact's question with each index swapped under the same model; tabulate which facts the
    answers (and the top passages) state."""
    started = time.perf_counter()
    questions = [f.question for f in facts]
    answers: dict[str, list[str]] = {}
    table: dict[str, dict[str, float]] = {}
    top: dict[str, dict[str, float]] = {}
    for name, index_dir in indexes.items():
        swapped = swap_index(model, index_dir)
        got, tops = [], []
        for start in range(0, len(questions), batch_size):
            out = swapped.generate(questions[start : start + batch_size], decoding)
            got += out.answers
            tops += [f"{t[0]}. {x[0]}" for t, x in zip(out.retrieved.titles, out.retrieved.texts, strict=True)]
        answers[name] = got
        table[name] = {which: _matches(got, facts, which) for which in ("A", "B")}
        top[name] = {which: _matches(tops, facts, which) for which in ("A", "B")}
    # the same generator with no passage: what the model "knows" without any index (its parameters)
    gen = model.generator
    prefix = gen.encode_prefix(gen.format_inputs(questions, None))
    out = decoding_generate(gen, prefix, torch.zeros(len(questions), 1), "token", decoding)
    answers["none"] = [gen.decode(seqs[0]) for seqs in out.sequences]
    table["none"] = {which: _matches(answers["none"], facts, which) for which in ("A", "B")}
    return HotSwapResult(list(facts), answers, table, top, time.perf_counter() - started)


def hotswap_markdown(result: HotSwapResult) -> str:
    """The paper's 2x2 table (rows: index plugged in; columns: whose facts the answers state)."""
    n = len(result.facts)
    lines = [
        "| index plugged in | answers stating facts A (%) | answers stating facts B (%) | top passage states A / B (%) |",
        "|---|---|---|---|",
    ]
    for name, row in result.table.items():
        t = result.top_passage.get(name)
        top = f"{100 * t['A']:.1f} / {100 * t['B']:.1f}" if t else "-"
        label = "none (closed-book)" if name == "none" else name
        lines.append(f"| {label} | {100 * row['A']:.1f} | {100 * row['B']:.1f} | {top} |")
    lines += ["", f"{n} questions; {result.seconds:.0f} s for both indexes.", ""]
    lines += ["| question | fact A | fact B | answer, index A | answer, index B | answer, no index |",
              "|---|---|---|---|---|---|"]
    for i, f in enumerate(result.facts[:10]):
        got = [result.answers[name][i] for name in ("A", "B", "none")]
        lines.append(f"| {f.question} | {f.fact_a} | {f.fact_b} | " + " | ".join(got) + " |")
    return "\n".join(lines) + "\n"


HOTSWAP_RELATIONS = ("capitals", "city-country")


def hotswap_facts(relation: str, n_questions: int = 40) -> list[ChangedFact]:
    """The built-in experiment's facts: Red-Trivia's world capitals ("capitals"), or the country of a
    city as its summary states it ("city-country", the second relation: not specific to capitals)."""
    from rag.resources import red_trivia_dir, wiki_summaries_path
    from rag.tasks import read_task

    summaries = json.loads(wiki_summaries_path().read_text(encoding="utf-8"))
    questions = read_task("red-trivia", red_trivia_dir(), subsets=["worldcapitals"])
    if relation == "capitals":
        return capital_facts(summaries, questions, limit=n_questions)
    if relation == "city-country":
        countries = [m.group(1) for e in questions for m in [CAPITAL_QUESTION.fullmatch(e.input)] if m]
        capitals = {a for e in questions for a in e.answers}  # capitals left out: another relation than theirs
        cities = {t: e for t, e in summaries.items() if t not in capitals}
        return city_country_facts(cities, countries, limit=n_questions)
    raise ValueError(f"hot-swap relation: expected one of {', '.join(HOTSWAP_RELATIONS)}, got {relation!r}")


def hotswap_experiment(
    model: RagModel, base_dir: Path | str, work_dir: Path | str, n_questions: int = 40,
    decoding: DecodingConfig | None = None, relation: str = "capitals",
) -> HotSwapResult:
    """The built-in experiment on the packaged data (hotswap_facts); index B derived from `base_dir`
    (cached in work_dir, rebuilt if the facts change)."""
    facts = hotswap_facts(relation, n_questions)
    swapped_dir = Path(work_dir) / ("index-facts-b" if relation == "capitals" else f"index-facts-b-{relation}")
    meta = swapped_dir / "meta.json"
    wanted = [dataclasses.asdict(f) for f in facts]
    if not meta.is_file() or json.loads(meta.read_text(encoding="utf-8")).get("changed_facts") != wanted:
        derive_knowledge_base(base_dir, facts, swapped_dir, device=str(model.generator.device))
    decoding = decoding or DecodingConfig(num_beams=1, max_new_tokens=12)
    return run_hotswap(model, {"A": base_dir, "B": swapped_dir}, facts, decoding)
