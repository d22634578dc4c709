"""The paper's Figure 2 as a PNG: RAG-Token's document posterior p(z_i | x, y_<=i) for each generated
token (columns) and each of the k retrieved passages (rows), from an `rag.answering.Answer`.

    rag ask --plot fig2.png "Hemingway"          # the CLI's way (rag/cli/ask.py)
    plot_token_posteriors(answer, "fig2.png")     # the same from Python

matplotlib (Agg backend) is imported only here, only when a figure is drawn.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from rag.io import atomic_path

if TYPE_CHECKING:
    from rag.answering import Answer


def token_posterior_matrix(answer: Answer) -> list[list[float]]:
    """(K, T): row j is passage j's posterior at each generated token (the end token too, when generated)."""
    if not answer.tokens:
        raise ValueError(f"no per-token posteriors for {answer.question!r}: only RAG-Token has them (--kind token), "
                         "and only for a non-empty answer")  # fmt: skip
    k = len(answer.passages)
    for token in answer.tokens:
        if len(token.posterior) != k:
            raise ValueError(f"token {token.token!r}: {len(token.posterior)} posteriors for {k} passages")
    return [[token.posterior[j] for token in answer.tokens] for j in range(k)]


def _token_label(token: str) -> str:
    shown = token.replace("\n", "\\n")
    return shown if shown.strip() else repr(token)


def plot_token_posteriors(answer: Answer, path: Path | str, title_chars: int = 36) -> Path:
    """Draw the heatmap of `answer` to the PNG `path` (written atomically); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    matrix = token_posterior_matrix(answer)  # (K, T)
    labels = [_token_label(t.token) for t in answer.tokens]
    rows = [f"{p.rank}. {textwrap.shorten(p.title, title_chars, placeholder='...')} (prior {p.prior:.2f})"
            for p in answer.passages]  # fmt: skip
    fig, ax = plt.subplots(figsize=(max(7.5, 0.42 * len(labels) + 5.0), 0.55 * len(rows) + 2.4))
    image = ax.imshow(matrix, aspect="auto", cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for j, row in enumerate(matrix):
        for i, value in enumerate(row):
            ax.text(i, j, f"{value:.2f}"[1:] if value < 1 else "1", ha="center", va="center", fontsize=6,
                    color="white" if value > 0.6 else "black")  # fmt: skip
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label("p(z_i | x, y_<=i)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    shown = [textwrap.shorten(f"x = {answer.question}", 100, placeholder="..."),
             textwrap.shorten(f"y = {answer.answer}", 100, placeholder="...")]  # fmt: skip
    ax.set_title("\n".join(shown), fontsize=9, loc="left")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
