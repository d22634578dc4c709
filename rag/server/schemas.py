"""The server's request and response types (pydantic; FastAPI builds the OpenAPI document from them).

Answers are rag.answering.Answer itself (a dataclass FastAPI documents as it is), so /v1/answer,
`rag ask --json` and the `rag` field of chat completions can never drift apart. Limits on what a
request may ask for live here; the byte size of a request body is limited by the app (--max-body-bytes).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rag.answering import Answer, Evidence

MAX_QUESTION_CHARS = 4000
MAX_K = 100
MAX_BEAMS = 16
MAX_NEW_TOKENS = 256
MAX_MESSAGES = 256


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty or blank")
    return text


class ModelOptions(Strict):
    """Per-request model settings; each defaults to the server's (rag serve's flags)."""

    k: int | None = Field(None, ge=1, le=MAX_K, description="passages retrieved and marginalised")
    kind: Literal["token", "sequence"] | None = Field(None, description="RAG-Token or RAG-Sequence")
    beams: int | None = Field(None, ge=1, le=MAX_BEAMS, description="beam size (1 = greedy)")
    decoding: Literal["thorough", "fast"] | None = Field(None, description="RAG-Sequence decoding")
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)


class AnswerRequest(ModelOptions):
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    stream: bool = Field(False, description="Server-Sent Events: passages, then one event per token, then the answer")

    _blank = field_validator("question")(_not_blank)


class SearchRequest(Strict):
    query: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    k: int = Field(5, ge=1, le=MAX_K)

    _blank = field_validator("query")(_not_blank)


class SearchHit(BaseModel):
    rank: int
    score: float = Field(description="q(x) . d(z)")
    id: str
    title: str
    text: str


class SearchResponse(BaseModel):
    """As `rag search --json` writes one query."""

    query: str
    hits: list[SearchHit]


class StreamPassages(BaseModel):
    """SSE `passages`: the retrieved passages before any token (posterior = prior)."""

    question: str
    kind: str
    k: int
    decoding: str
    passages: list[Evidence]


class StreamToken(BaseModel):
    """SSE `token`: one generated token and the passage posteriors after it."""

    step: int = Field(description="position i in the answer, from 0")
    token_id: int
    token: str
    delta: str = Field(description="text to append to what the stream has shown (may be empty)")
    posterior: list[float] | None = Field(description="p(z_i | x, y_<=i) per passage (RAG-Token; Figure 2)")
    running_posterior: list[float] | None = Field(
        description="p(z | x, y_<=i): Bayes over the passages given the answer so far (null when the "
        "tokens come after decoding: beam search, RAG-Sequence)"
    )


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, as OpenAI's API writes them."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["loading", "ready", "draining", "failed"]
    error: str | None = None
    model: dict[str, Any] | None = None
    knowledge_base: dict[str, Any] | None = None
    engine: dict[str, Any] | None = None


# ---------------------------------------------------------------- OpenAI-compatible chat completions


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    """OpenAI's chat completion request. RAG answers the last user message; sampling fields
    (temperature, top_p, ...) are accepted and ignored: decoding is the model's greedy / beam search."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    n: int | None = Field(None, ge=1, le=1, description="only one choice")
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    rag: ModelOptions | None = Field(None, description="extension: this request's k, kind, beams, decoding")


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    """OpenAI's chat completion, plus `rag`: the answer object of /v1/answer (passages with their prior
    and posterior, per-token posteriors), which plain clients ignore."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    rag: Answer


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One streamed chunk; `rag` holds the passages (first chunk), the token's posteriors (token chunks)
    or the whole answer object (last chunk)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    rag: dict[str, Any] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rag"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
