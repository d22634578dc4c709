"""The generator p_theta(y_i | x, z, y_<i): seq2seq (BART, T5) and decoder-only LMs behind one interface.

INTERFACE CONTRACT (decoding.py, model.py and training.py code against exactly this):

Rows. A batch of B questions with K passages each is laid out row-major: row b*K + j is question b with
its j-th passage. Closed-book use passes K = 1 and no passage.

    gen.format_inputs(questions: list[str], passages: list[list[tuple[str, str]]] | None) -> GeneratorInputs
        passages[b][j] = (title, text). Seq2seq: "title / text // question" (released RAG layout).
        Causal: a prompt holding passage and question (chat template where the model has one).
    gen.encode_targets(targets: list[str]) -> TargetBatch
        ids (N, T) with eos appended, right-padded with pad_token_id; mask (N, T) bool.
    gen.encode_prefix(inputs: GeneratorInputs) -> Prefix
        Runs the part that depends only on (x, z) once: the seq2seq encoder, or the causal prompt
        (prefill, key/value cache). Gradients flow when called under grad.
    gen.target_logprobs(prefix: Prefix, rows: LongTensor (N,), targets: TargetBatch) -> Tensor (N, T, V)
        Teacher-forced log-softmax over the vocabulary for each target position; target n is read
        under prefix row rows[n] (so one prefix serves many hypotheses without re-encoding).
        Position t is the distribution of targets.ids[n, t] given targets.ids[n, :t].
    gen.start(prefix: Prefix, rows: LongTensor (N,)) -> DecodeState
        A decoding state of N rows (row n continues prefix row rows[n]), before any generated token.
    gen.step(state: DecodeState, tokens: LongTensor (N,) | None) -> tuple[Tensor (N, V), DecodeState]
        Log-softmax of the next token. The first call passes None (distribution of the first target
        token); each later call feeds the tokens just chosen. Uses and extends the key/value cache.
    gen.reorder(state: DecodeState, index: LongTensor (N',)) -> DecodeState
        Select / duplicate rows (beam search), cache included.
    gen.eos_token_id, gen.pad_token_id, gen.vocab_size, gen.tokenizer, gen.family, gen.model (nn.Module)
"""

from __future__ import annotations
