"""Tiny random encoders saved as real checkpoint folders (BERT, sentence-transformers, DPR).

Every folder is written by transformers' own save_pretrained, so the loaders under test read the
same files they would read for a released checkpoint. Import in tests as `from tiny_encoders import ...`.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast, DPRConfig

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "capital", "of", "is", "city", "river", "what", "where", "largest", "country"]


def vocab() -> list[str]:
    chars = list(string.ascii_lowercase + string.digits) + list(".,;:!?'\"()-")
    return SPECIALS + chars + [f"##{c}" for c in string.ascii_lowercase + string.digits] + WORDS


def save_tokenizer(path: Path) -> BertTokenizerFast:
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab()) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab=str(path / "vocab.txt"), do_lower_case=True)  # transformers 5: vocab=
    tokenizer.save_pretrained(path)
    return tokenizer


def bert_config(**overrides: int) -> BertConfig:
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    sizes.update(overrides)
    return BertConfig(vocab_size=len(vocab()), max_position_embeddings=128, **sizes)


def tiny_bert_dir(path: Path, seed: int = 0) -> Path:
    """A plain transformers BERT encoder folder (config.json, weights, tokenizer)."""
    torch.manual_seed(seed)
    BertModel(bert_config()).eval().save_pretrained(path)
    save_tokenizer(path)
    return path


def tiny_sentence_transformers_dir(
    path: Path, seed: int = 0, pooling: str = "mean", normalize: bool = True
) -> Path:
    """A sentence-transformers folder layout (modules.json, 1_Pooling, optional Normalize) over tiny BERT."""
    tiny_bert_dir(path, seed)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    (path / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    (path / "1_Pooling").mkdir(exist_ok=True)
    pool = {
        "word_embedding_dimension": 32,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pool), encoding="utf-8")
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}), encoding="utf-8")
    return path


def tiny_dpr_dir(path: Path, side: str = "question", seed: int = 0, projection_dim: int = 0) -> Path:
    """A DPRQuestionEncoder / DPRContextEncoder folder as transformers saves it."""
    from transformers import DPRContextEncoder, DPRQuestionEncoder

    torch.manual_seed(seed)
    base = bert_config().to_dict()
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings")  # fmt: skip
    config = DPRConfig(projection_dim=projection_dim, **{k: base[k] for k in keys})
    model_class = DPRQuestionEncoder if side == "question" else DPRContextEncoder
    model_class(config).eval().save_pretrained(path)
    save_tokenizer(path)
    return path


# ---------------------------------------------------------------- a tiny JSON Lines corpus

CORPUS_WORDS = (
    "the capital of city river what where largest country angola luanda congo atlantic africa".split()
)
WORDS_PER_PASSAGE = 20


def write_corpus(path: Path, docs: int = 40, seed: int = 0) -> list[tuple[str, str]]:
    """A JSON Lines corpus of random word documents; returns (title, text) per document."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(docs):
        text = " ".join(rng.choice(CORPUS_WORDS, size=int(rng.integers(3, 70))))
        records.append((f"Doc {i} {CORPUS_WORDS[i % len(CORPUS_WORDS)]}", text))
    path.write_text("".join(json.dumps({"title": t, "text": x}) + "\n" for t, x in records), encoding="utf-8")
    return records


def tiny_knowledge_base(root: Path, encoder_seed: int, corpus_seed: int, docs: int = 40) -> tuple[Path, Path, Any, list[tuple[str, str]]]:
    """A knowledge base at root/kb: write_corpus's documents in 20-word passages, encoded by a tiny
    sentence-transformers d(z), exact index. Returns (kb folder, encoder folder, CorpusConfig, records)."""
    from rag.config import CorpusConfig, EncoderConfig, IndexConfig
    from rag.knowledge import build_knowledge_base

    encoder_dir = tiny_sentence_transformers_dir(root / "enc", seed=encoder_seed)
    records = write_corpus(root / "docs.jsonl", docs=docs, seed=corpus_seed)
    corpus = CorpusConfig(source=str(root / "docs.jsonl"), words_per_passage=WORDS_PER_PASSAGE)
    build_knowledge_base(corpus, EncoderConfig(path=str(encoder_dir)), IndexConfig(), root / "kb", progress=False)
    return root / "kb", encoder_dir, corpus, records


def expected_passages(records: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The paper's splitting done by hand: disjoint 20-word chunks, each with its document's title."""
    out = []
    for title, text in records:
        words = text.split()
        out += [
            (title, " ".join(words[i : i + WORDS_PER_PASSAGE]))
            for i in range(0, len(words), WORDS_PER_PASSAGE)
        ]
    return out


def word_encoder(seed: int):
    """A 1-layer random BERT over the word-level test tokenizer (no dropout), mean pooling, in memory."""
    from tiny_generators import word_tokenizer

    from rag.encoders import Encoder

    tokenizer = word_tokenizer(["<pad>", "<unk>"])
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        pad_token_id=0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return Encoder(BertModel(config), tokenizer, pooling="mean", normalize=False).eval()


def word_retriever(passages, store_path: Path, query_encoder, passage_encoder):
    """(stored d(z) (N, D), a Retriever over `passages` with an exact index): a real tiny knowledge base."""
    from rag.config import IndexConfig
    from rag.encoders import passage_text
    from rag.index import DenseIndex
    from rag.retriever import Retriever
    from rag.store import PassageStore, write_passage_store

    stored = passage_encoder.encode([passage_text(p.title, p.text) for p in passages])
    write_passage_store(passages, store_path)
    index = DenseIndex.build(stored, IndexConfig(kind="flat"))
    return stored, Retriever(index, PassageStore.open(store_path), query_encoder)
