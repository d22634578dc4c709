"""A synthetic knowledge task on which the retriever can only learn from the generator's signal.

The world. Entities are named by a first name and a surname. Questions name them in one language
("kovtal miresh"), the corpus in another ("udrane plisof"): every question word has its own
translation, and no question shares a word with any passage. Each entity has exactly one passage,
title = its name in the passage language, text = one value word that belongs to that entity alone;
the answer to the question naming the entity is that value. So the answer is in one passage only,
and the question gives no lexical hint of which.

Held out. All F x F name combinations exist; the test entities are the combinations on two
diagonals ((j - i) mod F in {0, F/2}): every test *word* occurs in training questions (in other
combinations), but no test entity, question or answer does. A retriever generalises to them only
by learning the word-to-word translation compositionally from the other entities; a generator can
only answer them by reading a retrieved passage (it cannot have memorised an answer it never saw).

Models (all random, trained from scratch; `build_world`):
- q(x) and d(z): BERT with no transformer layers (embedding bag + LayerNorm), mean pooling. A
  random deeper BERT maps every text to nearly the same direction (shared position and token-type
  embeddings dominate), so all questions would start with the same few passages; we zero the
  token-type embedding and shrink position embeddings, so the untrained retriever ranks passages
  close to uniformly at random (chance, but different for each question). d(z) is L2-normalised.
- the generator: a one-layer BART decoder over an embedding-only encoder. Before RAG training it
  is taught to *read* (copy the value of the passage it is given) in a disjoint world (other name
  words, gold passages), like BART's pre-training precedes RAG fine-tuning. It knows nothing of
  this corpus; without that step the reading skill and the retriever must bootstrap each other
  from the rare lucky retrievals and the generator memorises training answers first.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertModel,
    PreTrainedTokenizerFast,
)

from rag.config import CorpusConfig, EncoderConfig, GeneratorConfig, IndexConfig, RagConfig
from rag.generators import Generator, Seq2SeqGenerator

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # BART's ids 0..3
PUNCTUATION = [".", "/", "?"]


@dataclass(frozen=True)
class SyntheticConfig:
    names: int = 8  # F: first names and surnames per language; F * F entities and passages
    values: int = 64  # the answer vocabulary; each entity gets its own value (needs values >= F * F)
    reader_names: int = 200  # name words of the disjoint world the generator learns to read in
    dim: int = 64
    dropout: float = 0.0  # of every model; 0 keeps the few training steps deterministic in effect
    seed: int = 0


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str
    title: str  # the title of the one passage that holds the answer


@dataclass(frozen=True)
class SyntheticTask:
    passages: list[tuple[str, str]]  # (title, text), one per entity
    train: list[QAPair]
    test: list[QAPair]
    values: list[str]
    reader_names: list[str]  # disjoint from every word of the task

    def words(self) -> list[str]:
        seen = {w for t, x in self.passages for w in f"{t} {x}".split()}
        seen |= {w for p in self.train + self.test for w in p.question.split()}
        return sorted(seen | set(self.values) | set(self.reader_names))


def _fresh_words(rng: random.Random, count: int, taken: set[str], length: int = 6) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(length))
        if word not in taken:
            taken.add(word)
            out.append(word)
    return out


def make_task(config: SyntheticConfig) -> SyntheticTask:
    f = config.names
    if config.values < f * f:
        raise ValueError(f"SyntheticConfig: values={config.values} < names**2={f * f}: answers must be unique")
    rng = random.Random(config.seed)
    taken: set[str] = set()
    first_q, last_q = _fresh_words(rng, f, taken), _fresh_words(rng, f, taken)
    first_p, last_p = _fresh_words(rng, f, taken), _fresh_words(rng, f, taken)
    values = _fresh_words(rng, config.values, taken, length=5)
    reader_names = _fresh_words(rng, config.reader_names, taken)
    answers = rng.sample(values, f * f)
    passages, train, test = [], [], []
    for n, (i, j) in enumerate((i, j) for i in range(f) for j in range(f)):
        title = f"{first_p[i]} {last_p[j]}"
        passages.append((title, answers[n]))
        pair = QAPair(f"{first_q[i]} {last_q[j]}", answers[n], title)
        (test if (j - i) % f in (0, f // 2) else train).append(pair)
    return SyntheticTask(passages, train, test, values, reader_names)


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer (one token per word, punctuation split off), BART's special tokens."""
    vocab = {w: i for i, w in enumerate(SPECIALS + PUNCTUATION + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def random_encoder_model(vocab_size: int, dim: int, seed: int, dropout: float = 0.0) -> BertModel:
    """An untrained BERT embedding bag whose mean-pooled outputs differ from text to text."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=dim, num_hidden_layers=0, num_attention_heads=4,
        intermediate_size=2 * dim, max_position_embeddings=64, pad_token_id=1,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )  # fmt: skip
    model = BertModel(config)  # the pooler is unused (mean pooling) but saved, so loading is silent
    with torch.no_grad():  # why: see the module docstring (shared components make every text alike)
        model.embeddings.token_type_embeddings.weight.zero_()
        model.embeddings.position_embeddings.weight.mul_(0.1)
    return model


def random_generator(tokenizer: PreTrainedTokenizerFast, dim: int, seed: int,
                     dropout: float = 0.0) -> Seq2SeqGenerator:  # fmt: skip
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=len(tokenizer), d_model=dim, encoder_layers=0, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * dim,
        decoder_ffn_dim=2 * dim, max_position_embeddings=64, bos_token_id=0, pad_token_id=1,
        eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None, forced_eos_token_id=None,
        dropout=dropout, attention_dropout=dropout, activation_dropout=dropout,
    )  # fmt: skip
    model = BartForConditionalGeneration(config)
    return Seq2SeqGenerator(model, tokenizer, GeneratorConfig(path="synthetic-bart", max_input_tokens=32))


def reading_loss(generator: Generator, questions: list[str], passages: list[tuple[str, str]],
                 answers: list[str]) -> torch.Tensor:  # fmt: skip
    """Mean -log p(answer | question, gold passage) per target token: the plain generator NLL."""
    prefix = generator.encode_prefix(generator.format_inputs(questions, [[p] for p in passages]))
    targets = generator.encode_targets(answers)
    rows = torch.arange(len(questions))
    logprobs = generator.target_logprobs(prefix, rows, targets)  # (B, T, V)
    token = logprobs.gather(-1, targets.ids.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return -(token * targets.mask).sum() / targets.mask.sum()


def _reading_batch(task: SyntheticTask, rng: random.Random, size: int) -> tuple[list[str], list, list[str]]:
    """Fresh examples of the disjoint reading world: random names, a random value, its gold passage."""
    names = task.reader_names
    answers = [rng.choice(task.values) for _ in range(size)]
    passages = [(f"{rng.choice(names)} {rng.choice(names)}", a) for a in answers]
    questions = [f"{rng.choice(names)} {rng.choice(names)}" for _ in range(size)]
    return questions, passages, answers


def pretrain_reader(generator: Generator, task: SyntheticTask, steps: int = 400, lr: float = 2e-3,
                    batch_size: int = 16, seed: int = 0) -> float:  # fmt: skip
    """Teach the generator to copy the value of its passage; returns accuracy on fresh examples."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(generator.parameters(), lr=lr, weight_decay=0.0)
    generator.train()
    for _ in range(steps):
        loss = reading_loss(generator, *_reading_batch(task, rng, batch_size))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    generator.eval()
    questions, passages, answers = _reading_batch(task, rng, 200)
    with torch.no_grad():
        prefix = generator.encode_prefix(generator.format_inputs(questions, [[p] for p in passages]))
        logprobs, _ = generator.step(generator.start(prefix, torch.arange(len(questions))), None)  # (N, V)
    first = [generator.tokenizer.convert_tokens_to_ids(a) for a in answers]
    return float((logprobs.argmax(-1) == torch.tensor(first)).float().mean())


def write_qa_jsonl(pairs: list[QAPair], path: Path) -> Path:
    """The `rag train` data format: input/target plus question/answers for QA metrics."""
    lines = [
        json.dumps({"input": p.question, "target": p.answer, "question": p.question, "answers": [p.answer]})
        for p in pairs
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def build_world(task: SyntheticTask, out_dir: Path, config: SyntheticConfig, reader_steps: int = 400,
                kind: str = "sequence", k: int = 8) -> tuple[RagConfig, float]:  # fmt: skip
    """Save q(x), d(z) and the (reader-pre-trained) generator as model folders, build the knowledge
    base with the library's own builder, and return the RagConfig that loads them (and the reader's
    accuracy in its own world)."""
    from rag.knowledge import build_knowledge_base

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = word_tokenizer(task.words())
    dirs = {name: out_dir / name for name in ("query_encoder", "passage_encoder", "generator")}
    for name, seed in (("query_encoder", config.seed + 1), ("passage_encoder", config.seed + 2)):
        random_encoder_model(len(tokenizer), config.dim, seed, config.dropout).save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    generator = random_generator(tokenizer, config.dim, config.seed + 3, config.dropout)
    accuracy = pretrain_reader(generator, task, steps=reader_steps, seed=config.seed)
    generator.model.save_pretrained(dirs["generator"])
    tokenizer.save_pretrained(dirs["generator"])
    corpus = out_dir / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"title": t, "text": x}) + "\n" for t, x in task.passages), "utf-8")
    passage_encoder = EncoderConfig(path=str(dirs["passage_encoder"]), kind="transformers", pooling="mean",
                                    normalize=True)  # fmt: skip
    build_knowledge_base(CorpusConfig(source=str(corpus), format="jsonl"), passage_encoder, IndexConfig(),
                         out_dir / "kb", progress=False)  # fmt: skip
    rag_config = RagConfig(
        kind=kind,  # type: ignore[arg-type]
        k=k,
        query_encoder=EncoderConfig(path=str(dirs["query_encoder"]), kind="transformers", pooling="mean",
                                    normalize=False),  # fmt: skip
        generator=GeneratorConfig(path=str(dirs["generator"]), family="seq2seq", max_input_tokens=32),
        index_dir=str(out_dir / "kb"),
    )
    return rag_config, accuracy
