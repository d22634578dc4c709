"""OpenAI's chat completion format around RAG answers: the question is the last user message, the
reply the answer, and the `rag` extra field carries the evidence (plain clients ignore it).

    non-streamed: {"choices": [{"message": {"content": answer}}], "rag": <the /v1/answer object>}
    streamed:     first chunk  delta {"role": "assistant"},  rag {"passages": [...], "kind", "k", ...}
                  token chunks delta {"content": piece},      rag {"token": {token, posterior, ...}}
                  last chunk   finish_reason stop | length,   rag <the /v1/answer object>
                  then data: [DONE]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from rag.answering import Answer, Evidence, answer_dict
from rag.server.schemas import ChatMessage


class NoQuestion(ValueError):
    """The messages hold no user text to answer (the app answers 422)."""


def question_of(messages: list[ChatMessage]) -> str:
    """The text of the last user message (a string, or the text parts of a content list)."""
    for message in reversed(messages):
        if message.role != "user":
            continue
        content = message.content
        if isinstance(content, list):
            content = " ".join(str(part.get("text", "")) for part in content if part.get("type") == "text")
        if not content or not content.strip():
            raise NoQuestion("messages: the last user message has no text")
        return content
    raise NoQuestion("messages: no message with role 'user'")


@dataclass(frozen=True)
class Completion:
    """One chat completion's identity; builds its response or its chunks."""

    id: str
    created: int
    model: str
    eos_token_id: int

    def finish_reason(self, answer: Answer) -> str:
        ended = bool(answer.token_ids) and answer.token_ids[-1] == self.eos_token_id
        return "stop" if ended or not answer.token_ids else "length"

    def message(self, answer: Answer) -> dict[str, Any]:
        return {
            **self._head("chat.completion"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.answer},
                         "finish_reason": self.finish_reason(answer)}],  # fmt: skip
            "rag": answer_dict(answer),
        }

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _chunk(self, delta: dict[str, Any], rag: dict[str, Any] | None, finish: str | None = None) -> dict[str, Any]:
        return {**self._head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "rag": rag}  # fmt: skip

    def first_chunk(self, passages: list[Evidence]) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""}, {"passages": [asdict(p) for p in passages]})

    def token_chunk(self, token: dict[str, Any]) -> dict[str, Any]:
        return self._chunk({"content": token["delta"]}, {"token": token})

    def content_chunk(self, text: str) -> dict[str, Any]:
        return self._chunk({"content": text}, None)

    def last_chunk(self, answer: Answer) -> dict[str, Any]:
        return self._chunk({}, answer_dict(answer), self.finish_reason(answer))
