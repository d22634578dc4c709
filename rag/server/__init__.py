"""`rag serve`: a long-running RAG service (rag.server.app) over the micro-batching engine
(rag.server.engine), with an OpenAI-compatible chat endpoint (rag.server.chat) and a web page."""

from rag.server.app import Served, ServerConfig, create_app

__all__ = ["ServerConfig", "Served", "create_app"]
