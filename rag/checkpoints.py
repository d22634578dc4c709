"""Released RAG checkpoints (transformers layout) and DPR encoders from local folders.

The published `facebook/rag-sequence-nq` and `rag-token-nq` are folders holding a `config.json`
(model_type "rag", with `question_encoder` and `generator` sub-configs), one weights file whose keys
are `rag.question_encoder.*` (a DPRQuestionEncoder) and `rag.generator.*` (BART), and the two
tokenizers in `question_encoder_tokenizer/` and `generator_tokenizer/`. A folder with the two parts as
separate transformers folders (`question_encoder/`, `generator/`, each with its tokenizer) is read too.

Nothing is downloaded: transformers reads the local folder. The pieces become our components:
the question encoder an `Encoder` (CLS pooling, no normalisation: DPR's inner product), the generator
a `Seq2SeqGenerator` that lays out its input exactly as transformers' RagRetriever does for that
checkpoint (its title/doc separators, and the question as the question tokenizer gives it back: the
released DPR tokenizer is uncased, so the generator reads the question lower-cased).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import nn

from rag.config import GeneratorConfig
from rag.generators import Seq2SeqGenerator

Kind = Literal["token", "sequence"]
_ARCHITECTURES: dict[str, Kind] = {"RagTokenForGeneration": "token", "RagSequenceForGeneration": "sequence"}


class CheckpointError(ValueError):
    pass


class ReleasedRagGenerator(Seq2SeqGenerator):
    """A Seq2SeqGenerator with a released checkpoint's input layout (RagRetriever.postprocess_docs)."""

    def __init__(self, model: nn.Module, tokenizer, config: GeneratorConfig, question_tokenizer,
                 title_sep: str, doc_sep: str, prefix: str) -> None:
        super().__init__(model, tokenizer, config)
        self.question_tokenizer = question_tokenizer
        self.title_sep, self.doc_sep, self.input_prefix = title_sep, doc_sep, prefix

    def format_text(self, question: str, title: str | None, text: str | None) -> str:
        # RagRetriever.__call__ passes the question through question_encoder_tokenizer.decode
        ids = self.question_tokenizer(question, add_special_tokens=True)["input_ids"]
        question = self.question_tokenizer.decode(ids, skip_special_tokens=True)
        return super().format_text(question, title, text)


@dataclass(frozen=True)
class RagCheckpoint:
    """What a released checkpoint holds, as our components."""

    path: Path
    kind: Kind  # from config.json "architectures" (RagTokenForGeneration / RagSequenceForGeneration)
    n_docs: int  # the k it was trained with
    query_encoder: nn.Module  # rag.encoders.Encoder
    generator: ReleasedRagGenerator


def _read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; a RAG checkpoint folder has config.json (model_type 'rag')")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: line {err.lineno}: not valid JSON ({err.msg})") from err
    if data.get("model_type") != "rag":
        raise CheckpointError(f"{file}: field 'model_type' is {data.get('model_type')!r}, expected 'rag'")
    return data


def checkpoint_kind(config: dict, path: Path) -> Kind:
    kinds = {_ARCHITECTURES[a] for a in config.get("architectures") or [] if a in _ARCHITECTURES}
    if len(kinds) != 1:
        raise CheckpointError(
            f"{path / 'config.json'}: field 'architectures' is {config.get('architectures')!r}; expected "
            "RagTokenForGeneration or RagSequenceForGeneration (pass kind= to choose)"
        )
    return kinds.pop()


def _tokenizer(path: Path, names: tuple[str, ...]):
    from transformers import AutoTokenizer

    for name in names:
        if (path / name).is_dir():
            return AutoTokenizer.from_pretrained(path / name)
    raise CheckpointError(f"{path}: no tokenizer folder (looked for {', '.join(names)})")


def _module(path: Path, part: Literal["question_encoder", "generator"]) -> nn.Module:
    """The DPRQuestionEncoder or the seq2seq generator, from either layout, in eval mode."""
    from transformers import AutoModelForSeq2SeqLM, DPRQuestionEncoder, RagTokenForGeneration

    if (path / "question_encoder").is_dir() and (path / "generator").is_dir():
        cls = DPRQuestionEncoder if part == "question_encoder" else AutoModelForSeq2SeqLM
        return cls.from_pretrained(path / part).eval()
    # RagToken and RagSequence store the same weights; either class reads both kinds
    whole = RagTokenForGeneration.from_pretrained(path)
    return getattr(whole.rag, part).eval()


def dpr_as_encoder(dpr: nn.Module, tokenizer, max_length: int = 256) -> nn.Module:
    """A transformers DPRQuestionEncoder / DPRContextEncoder as our Encoder: its pooler_output (the CLS
    state, projected when projection_dim > 0), not normalised (DPR scores by inner product)."""
    from rag.encoders import Encoder

    return Encoder(dpr, tokenizer, pooling="pooler", normalize=False, max_length=max_length)


def load_dpr_encoder(path: Path | str, side: Literal["question", "context"], device: str = "cpu") -> nn.Module:
    """A DPR question or context encoder saved by transformers (e.g. facebook/dpr-*-single-nq-base)."""
    from rag.config import EncoderConfig
    from rag.encoders import load_encoder

    kind: Literal["dpr-question", "dpr-context"] = "dpr-question" if side == "question" else "dpr-context"
    return load_encoder(EncoderConfig(path=str(path), kind=kind), device)


def load_rag_generator(path: Path | str, device: str = "cpu") -> ReleasedRagGenerator:
    """The checkpoint's generator with its input layout (separators, prefix, question round trip)."""
    path = Path(path)
    config = _read_config(path)
    generator = _module(path, "generator")
    gen_config = GeneratorConfig(
        path=str(path), family="seq2seq", max_input_tokens=int(config.get("max_combined_length", 300))
    )
    return ReleasedRagGenerator(
        generator.to(device),
        _tokenizer(path, ("generator_tokenizer", "generator")),
        gen_config,
        _tokenizer(path, ("question_encoder_tokenizer", "question_encoder")),
        config.get("title_sep", " / "),
        config.get("doc_sep", " // "),
        config.get("generator", {}).get("prefix") or "",
    )


def load_rag_checkpoint(path: Path | str, device: str = "cpu", kind: Kind | None = None) -> RagCheckpoint:
    """Our components from a released RAG checkpoint folder (see the module docstring for layouts)."""
    path = Path(path)
    config = _read_config(path)
    kind = kind or checkpoint_kind(config, path)
    generator = load_rag_generator(path, device)
    question = _module(path, "question_encoder")
    encoder = dpr_as_encoder(question, generator.question_tokenizer).to(device)
    return RagCheckpoint(path, kind, int(config.get("n_docs", 5)), encoder, generator)
