"""rag: Retrieval-Augmented Generation as Lewis et al. (2020) define it.

The data flow, one module per stage: corpus -> encoders -> index -> retriever -> generators ->
marginalize -> model -> decoding -> training -> evaluation -> cli.
"""

from __future__ import annotations

__version__ = "0.1.0"
