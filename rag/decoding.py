"""Decoding: RAG-Token greedy / beam search and RAG-Sequence "thorough" / "fast" (Lewis et al. 2020, sec 2.5).

Everything is batched over questions and passages on the generator's key/value cache (the INTERFACE
CONTRACT in rag/generators/base.py). Shapes: B questions, K passages, nb beams, R returned sequences,
V vocabulary, L = max_new_tokens.

- RAG-Token: the decoder holds B*nb*K rows (passages innermost); each step's next-token distribution is
  the marginal logsumexp_z [log p(z|x) + log p(y_i | x, z, y_<i)] (eq. 2), so an ordinary beam search over
  B*nb beams runs on it. The prior p(z|x) is fixed per question, as in transformers' RagTokenForGeneration.
- RAG-Sequence: an ordinary beam search under each passage (B*K groups), the union of the hypotheses per
  question, then p(y|x) = sum_z p(z|x) p(y|x,z) (eq. 1). "thorough" scores every hypothesis under every
  passage, with an extra teacher-forced pass (on the cached prefix) only where a hypothesis did not come
  out of that passage's beam; "fast" takes p(y|x,z) = 0 there.

The search itself reproduces transformers' `_beam_search` / greedy rules step for step (top 2*nb
candidates, only the top nb may finish, length_penalty, the early-stopping heuristic, min_new_tokens,
forced BOS / EOS) so that generated sequences equal the reference implementation's.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Generator as Stream
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor

from rag import marginalize as M
from rag.config import DecodingConfig
from rag.generators import Prefix, TargetBatch

_BLOCKED = -1.0e9  # transformers' score for candidates that may not continue / finish
_ROWS_PER_PASS = 2**26  # rescoring: at most this many (row x position x vocab) floats per forward


@dataclass(frozen=True)
class SearchOptions:
    """transformers' generation knobs that DecodingConfig leaves at their defaults."""

    length_penalty: float = 1.0  # finished score = log-prob / (generated length ** length_penalty)
    early_stopping: bool | Literal["never"] = False
    forced_tokens: Literal["model", "none"] = "model"  # "model": the model's forced_bos/eos_token_id


@dataclass(frozen=True)
class Generation:
    """R hypotheses per question, best first (fewer only when de-duplication leaves fewer)."""

    sequences: list[list[list[int]]]  # (B, R, len) generated ids: eos included when generated, no start token
    scores: Tensor  # (B, R) log p(y|x) under the decoding model (fast: its approximation); -inf pads
    doc_logprior: Tensor  # (B, K) log p(z|x)
    passage_logprobs: Tensor  # (B, R, K) log p(y|x,z) (fast: -inf where y is not in z's beam)
    doc_logposterior: Tensor  # (B, R, K) log p(z|x,y) = Bayes over the passages (sequence view)
    token_doc_logposterior: Tensor | None  # RAG-Token: (B, R, L, K) log p(z_i|x,y_<=i), Figure 2


@dataclass(frozen=True)
class Candidates:
    """RAG-Sequence: the union of the per-passage beams per question, scored under every passage."""

    sequences: list[list[list[int]]]  # (B, n_b, len)
    passage_logprobs: list[Tensor]  # B tensors (n_b, K): log p(y|x,z); -inf where not computed (fast)
    in_beam: list[Tensor]  # B tensors (n_b, K) bool: the hypothesis came out of passage z's beam


@dataclass(frozen=True)
class _Found:
    """What one search returns for G groups of n hypotheses."""

    tokens: Tensor  # (G, n, L) long, pad after the end
    lengths: Tensor  # (G, n) long
    score: Tensor  # (G, n) the search's ranking score (processed, length-normalised)
    logprob: Tensor  # (G, n) raw sum of the next-token log-probs (marginal for RAG-Token)
    doc_logprobs: Tensor  # (G, n, block, L) raw log p(y_i | x, z, y_<i) per block row, 0 past the end

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The fields in order (dataclasses.astuple would deep-copy them)."""
        return self.tokens, self.lengths, self.score, self.logprob, self.doc_logprobs

    def map(self, fn: Callable[[Tensor], Tensor]) -> _Found:
        """fn applied to every field (each indexed by group first)."""
        return _Found(*(fn(t) for t in self.tensors()))


@dataclass(frozen=True)
class _Rules:
    eos: int
    pad: int
    max_new: int
    min_new: int
    forced_bos: int | None
    forced_eos: int | None
    options: SearchOptions


class _Stepper:
    """Drives the generator over G groups of `block` rows (RAG-Token: the K passages; RAG-Sequence: 1)."""

    def __init__(self, gen: Any, prefix: Prefix, groups: int, block: int, prior: Tensor | None,
                 room: int = 0) -> None:
        if len(prefix) != groups * block:
            raise ValueError(f"the prefix holds {len(prefix)} rows; B*K = {groups * block} expected (row b*K + z)")
        self.gen, self.groups, self.block, self.prior = gen, groups, block, prior  # prior (G, block)
        device = prior.device if prior is not None else prefix.attention_mask.device
        self.offsets = torch.arange(block, device=device)  # (block,)
        self.state = gen.start(prefix, torch.arange(groups * block, device=device), room=room)

    def _combine(self, logp: Tensor, beams: int) -> tuple[Tensor, Tensor]:
        per_doc = logp.view(-1, self.block, logp.shape[-1])  # (N, block, V)
        if self.prior is None:
            return per_doc[:, 0], per_doc  # (N, V), (N, 1, V)
        prior = self.prior.repeat_interleave(beams, dim=0)  # (N, block)
        # log_softmax again as transformers' search does on the marginal, so the numbers agree to the bit
        marginal = torch.log_softmax(M.token_marginal_next(per_doc, prior), dim=-1)  # (N, V)
        return marginal, per_doc

    def first(self) -> tuple[Tensor, Tensor]:
        logp, self.state = self.gen.step(self.state, None)  # (G*block, V)
        return self._combine(logp, 1)

    def keep_groups(self, keep: Tensor) -> None:
        """Drop the groups that have finished (greedy): keep (A,) positions of the groups still decoding,
        in the current state. Their rows, cache and prior are selected; each row's numbers stay its own."""
        rows = (keep[:, None] * self.block + self.offsets).flatten()  # (A*block,)
        self.state = self.gen.reorder(self.state, rows)
        self.select_groups(keep)

    def select_groups(self, keep: Tensor) -> None:
        """keep_groups' bookkeeping, for a caller whose next `advance` source selects the rows itself
        (beam search: the groups' beams are reordered anyway)."""
        self.groups = keep.shape[0]
        if self.prior is not None:
            self.prior = self.prior.index_select(0, keep)

    def advance(self, source: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """source (N,): for each new beam the flat index of the beam it continues; tokens (N,) fed to it."""
        rows = (source[:, None] * self.block + self.offsets).flatten()  # (N*block,)
        if rows.shape[0] != len(self.state) or not torch.equal(rows, torch.arange(len(rows), device=rows.device)):
            self.state = self.gen.reorder(self.state, rows)  # greedy keeps its rows: skip the cache copy
        logp, self.state = self.gen.step(self.state, tokens.repeat_interleave(self.block))  # (N*block, V)
        return self._combine(logp, source.shape[0] // self.groups)


def _process(logp: Tensor, step: int, rules: _Rules) -> Tensor:
    """transformers' logits processors, in their order: min_new_tokens, forced BOS, forced EOS."""
    out = logp
    if step < rules.min_new:
        out = out.clone()
        out[..., rules.eos] = float("-inf")
    for forced, at in ((rules.forced_bos, 0), (rules.forced_eos, rules.max_new - 1)):
        if forced is not None and step == at:
            out = torch.full_like(out, float("-inf"))
            out[..., forced] = 0.0
    return out


def _gather(t: Tensor, index: Tensor) -> Tensor:
    """t (G, n, ...) -> (G, m, ...) along the beam axis with index (G, m)."""
    return torch.take_along_dim(t, index.view(index.shape + (1,) * (t.dim() - 2)), dim=1)


@dataclass(frozen=True)
class _GreedyStep:
    """One step of greedy search over G groups, handed out before the next forward is run."""

    step: int
    tokens: Tensor  # (G,) chosen token (pad where the group had ended before this step)
    generated: Tensor  # (G,) bool: the group produced tokens[g] at this step (eos included)
    doc_logprobs: Tensor  # (G, block) log p(y_i | x, z, y_<i) of the chosen token per block row


def _greedy_steps(stepper: _Stepper, rules: _Rules) -> Stream[_GreedyStep, None, _Found]:
    """transformers' greedy search: argmax, pad after eos, stop when every row has ended. Yields each
    step as soon as its tokens are chosen (streaming); the generator's return value is the _Found.

    A group that has ended (its answer reached eos, e.g. the newline of a short answer) leaves the
    decoder state at once: later steps run only the groups still decoding (their numbers are what they
    would be in the full batch: tests/test_decoding.py, batched == alone)."""
    marg, per_doc = stepper.first()  # (G, V), (G, block, V)
    groups, block, L = marg.shape[0], per_doc.shape[1], rules.max_new
    rows = torch.arange(groups, device=marg.device)
    active = rows  # (A,) the groups the decoder state holds, in its order
    tokens = marg.new_full((groups, L), rules.pad, dtype=torch.long)  # (G, L)
    logprob, doc = marg.new_zeros(groups), marg.new_zeros(groups, block, L)
    lengths = torch.zeros(groups, dtype=torch.long, device=marg.device)
    alive = torch.ones(groups, dtype=torch.bool, device=marg.device)  # (G,)
    for step in range(L):
        tok = torch.where(alive, _process(marg, step, rules).argmax(-1), rules.pad)  # (G,)
        tokens[:, step] = tok
        logprob += torch.where(alive, marg[rows, tok], 0.0)
        doc[:, :, step] = torch.where(alive[:, None], per_doc[rows, :, tok], 0.0)
        lengths += alive.long()
        yield _GreedyStep(step, tok, alive.clone(), doc[:, :, step])
        alive &= tok != rules.eos
        if not alive.any() or step + 1 == L:
            break
        still = alive[active]  # (A,)
        if not bool(still.all()):
            keep = still.nonzero().squeeze(1)  # (A',) positions in the state
            stepper.keep_groups(keep)
            active = active[keep]
        step_marg, step_doc = stepper.advance(torch.arange(active.shape[0], device=marg.device), tok[active])
        if active.shape[0] == groups:
            marg, per_doc = step_marg, step_doc
        else:  # ended groups keep zeros: their tokens are pad from here on (alive is False)
            marg, per_doc = marg.new_zeros(marg.shape), per_doc.new_zeros(per_doc.shape)
            marg[active], per_doc[active] = step_marg, step_doc
    return _Found(tokens[:, None], lengths[:, None], logprob[:, None], logprob[:, None], doc[:, None])


def _greedy(stepper: _Stepper, rules: _Rules) -> _Found:
    steps = _greedy_steps(stepper, rules)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def _beam_search(stepper: _Stepper, nb: int, rules: _Rules) -> _Found:
    """transformers' `_beam_search` (vectorised since v4.50), one search per group.

    A group whose search is over (_settled: nb hypotheses finished and none of its running beams can
    beat them) leaves the decoder state at once, as greedy search drops ended questions: transformers
    keeps stepping it, but nothing it computes can enter its finished pool any more (the pool's scores
    are real, every later candidate carries the -1e9 block). Its pool is written out and the search
    goes on with the groups still open (tests/test_decoding.py: equal to the search without dropping)."""
    marg, per_doc = stepper.first()  # (G, V), (G, block, V)
    (groups, vocab), block, L, opts = marg.shape, per_doc.shape[1], rules.max_new, rules.options
    dev, keep = marg.device, 2 * nb
    marg, per_doc = marg[:, None].expand(groups, nb, vocab), per_doc[:, None].expand(groups, nb, block, vocab)
    g_idx = torch.arange(groups, device=dev)[:, None]  # (A, 1) positions of the open groups in the state
    top_nb = torch.arange(keep, device=dev) < nb  # (2nb,)
    run_tok = torch.full((groups, nb, L), rules.pad, dtype=torch.long, device=dev)
    run_score = torch.zeros(groups, nb, device=dev)
    run_score[:, 1:] = _BLOCKED  # every beam starts as a copy of beam 0: expand that one only
    run_raw, run_doc = torch.zeros(groups, nb, device=dev), torch.zeros(groups, nb, block, L, device=dev)
    fin = _Found(run_tok.clone(), torch.zeros_like(run_tok[..., 0]), torch.full_like(run_score, _BLOCKED),
                 run_raw.clone(), run_doc.clone())
    out = fin.map(torch.clone)
    open_groups = torch.arange(groups, device=dev)  # (A,) the groups still searching, in state order
    finished = torch.zeros(groups, nb, dtype=torch.bool, device=dev)
    unsatisfied = torch.ones(groups, 1, dtype=torch.bool, device=dev)  # early-stop heuristic not yet met
    for step in range(L):
        active = open_groups.shape[0]
        acc = (_process(marg, step, rules) + run_score[:, :, None]).view(active, nb * vocab)
        top_score, top_idx = torch.topk(acc, keep)  # (A, 2nb)
        src, tok = top_idx // vocab, top_idx % vocab  # (A, 2nb)
        cand_tok = _gather(run_tok, src).clone()
        cand_tok[:, :, step] = tok
        cand_raw = _gather(run_raw, src) + marg.reshape(active, -1).gather(1, top_idx)  # (A, 2nb)
        cand_doc = _gather(run_doc, src).clone()
        cand_doc[:, :, :, step] = per_doc[g_idx, src, :, tok]  # (A, 2nb, block)
        hits = (tok == rules.eos) | (step + 1 >= L)  # (A, 2nb) eos or max length
        # running beams: the best nb candidates that did not stop
        run_cand = top_score + hits.to(torch.float32) * _BLOCKED
        nxt = torch.topk(run_cand, nb)[1]  # (A, nb)
        run_tok, run_score, run_raw, run_doc = (_gather(t, nxt) for t in (cand_tok, run_cand, cand_raw, cand_doc))
        # finished pool: candidates in the top nb that stopped, merged with the old pool by score
        just = hits & top_nb
        norm = top_score / ((step + 1) ** opts.length_penalty)
        norm += (finished.all(-1, keepdim=True) & (opts.early_stopping is True)).to(torch.float32) * _BLOCKED
        norm += (~unsatisfied).to(torch.float32) * _BLOCKED
        norm += (~just) * _BLOCKED
        best = torch.topk(torch.cat((fin.score, norm), 1), nb)[1]  # (A, nb)
        lengths = torch.full_like(tok, step + 1)
        candidates = (cand_tok, lengths, norm, cand_raw, cand_doc)
        fin = _Found(*(_gather(torch.cat(pair, 1), best) for pair in zip(fin.tensors(), candidates, strict=True)))
        finished = _gather(torch.cat((finished, just), 1), best)
        unsatisfied = _heuristic(unsatisfied, run_score, fin.score, finished, step + 1, L, opts)
        # (with nb >= 1 at most nb of the 2nb candidates are eos: hits.all() only at the length limit, so
        # dropping settled groups never changes when the loop ends)
        open_beam = not (bool(finished.all()) and opts.early_stopping is True)
        if not (bool(unsatisfied.any()) and open_beam and not bool(hits.all())):
            break
        settled = _settled(unsatisfied, finished, fin.score)  # (A,)
        stay = (~settled).nonzero().squeeze(1)  # (A',) positions among the open groups
        if stay.shape[0] < active:
            _write(out, fin, open_groups, settled)
            open_groups = open_groups[stay]
            stepper.select_groups(stay)
            fin = fin.map(partial(torch.index_select, dim=0, index=stay))
            run_tok, run_score, run_raw, run_doc, finished, unsatisfied, src, nxt = (
                t.index_select(0, stay) for t in (run_tok, run_score, run_raw, run_doc, finished, unsatisfied,
                                                  src, nxt))  # fmt: skip
            source_groups = g_idx[stay]
            g_idx = torch.arange(stay.shape[0], device=dev)[:, None]
        else:
            source_groups = g_idx
        # (A', nb) flat beam of the state each new beam continues
        source = (source_groups * nb + _gather(src, nxt)).flatten()
        if step == 0:
            source = source // nb  # the state still holds one row block per group
        marg, per_doc = stepper.advance(source, run_tok[:, :, step].flatten())
        marg, per_doc = marg.view(-1, nb, vocab), per_doc.view(-1, nb, block, vocab)
    _write(out, fin, open_groups, torch.ones_like(open_groups, dtype=torch.bool))
    return out


def _settled(unsatisfied: Tensor, finished: Tensor, fin_score: Tensor) -> Tensor:
    """(A,) groups whose finished pool can no longer change: the heuristic is met, all nb hypotheses
    have finished, and their scores are real (above the -1e9 block every later candidate carries)."""
    return ~unsatisfied[:, 0] & finished.all(-1) & (fin_score.min(-1).values > _BLOCKED / 10)


def _write(out: _Found, fin: _Found, groups: Tensor, which: Tensor) -> None:
    """out[groups[which]] = fin[which], field by field (out is indexed by the original group)."""
    rows = which.nonzero().squeeze(1)
    for into, part in zip(out.tensors(), fin.tensors(), strict=True):
        into[groups[rows]] = part[rows]


def _heuristic(unsatisfied: Tensor, run_score: Tensor, fin_score: Tensor, finished: Tensor,
               generated: int, max_new: int, opts: SearchOptions) -> Tensor:
    """transformers' _check_early_stop_heuristic: can a running beam still beat the worst finished one?"""
    if opts.early_stopping == "never" and opts.length_penalty > 0.0:
        best_length = max_new
    else:
        best_length = generated
    best_possible = run_score[:, :1] / (best_length**opts.length_penalty)  # (G, 1)
    worst = torch.where(finished, torch.min(fin_score, dim=1, keepdim=True)[0], _BLOCKED)  # (G, nb)
    return unsatisfied & torch.any(best_possible > worst, dim=-1, keepdim=True)


def _rules(gen: Any, config: DecodingConfig, options: SearchOptions) -> _Rules:
    forced: dict[str, int | None] = {"forced_bos_token_id": None, "forced_eos_token_id": None}
    if options.forced_tokens == "model":
        settings = getattr(gen.model, "generation_config", None) or gen.model.config
        forced = {name: getattr(settings, name, None) for name in forced}
    bos = forced["forced_bos_token_id"] if gen.family == "seq2seq" else None  # transformers: at length 1
    if config.max_new_tokens < 1:
        raise ValueError(f"DecodingConfig.max_new_tokens must be >= 1, got {config.max_new_tokens}")
    return _Rules(gen.eos_token_id, gen.pad_token_id, config.max_new_tokens, config.min_new_tokens,
                  bos, forced["forced_eos_token_id"], options)


def _search(gen: Any, prefix: Prefix, groups: int, block: int, prior: Tensor | None,
            config: DecodingConfig, options: SearchOptions) -> _Found:
    stepper = _Stepper(gen, prefix, groups, block, prior, room=config.max_new_tokens)
    rules = _rules(gen, config, options)
    return _greedy(stepper, rules) if config.num_beams == 1 else _beam_search(stepper, config.num_beams, rules)


def _as_lists(tokens: Tensor, lengths: Tensor) -> list[list[list[int]]]:
    """(G, n, L) ids and (G, n) lengths -> G lists of n token lists, cut at their lengths."""
    pairs = zip(tokens.tolist(), lengths.tolist(), strict=True)
    return [[row[:n] for row, n in zip(rows, ns, strict=True)] for rows, ns in pairs]


@torch.no_grad()
def rag_token_generate(gen: Any, prefix: Prefix, doc_logprior: Tensor, config: DecodingConfig,
                       options: SearchOptions = SearchOptions()) -> Generation:
    """RAG-Token greedy (num_beams = 1) or beam search on the per-step marginal over the K passages (eq. 2)."""
    batch, docs = doc_logprior.shape
    ret = config.num_return_sequences
    if ret > config.num_beams:
        raise ValueError(f"num_return_sequences ({ret}) must be <= num_beams ({config.num_beams})")
    found = _search(gen, prefix, batch, docs, doc_logprior, config, options)
    return _token_generation(found, doc_logprior, config)


def _token_generation(found: _Found, doc_logprior: Tensor, config: DecodingConfig) -> Generation:
    """RAG-Token's Generation from the search's R best of B groups: passage and per-token posteriors."""
    batch, docs = doc_logprior.shape
    ret = config.num_return_sequences
    doc_lp = found.doc_logprobs[:, :ret]  # (B, R, K, L)
    lengths = found.lengths[:, :ret]  # (B, R)
    passage = doc_lp.sum(-1)  # (B, R, K) log p(y|x,z)
    flat_prior = doc_logprior.repeat_interleave(ret, dim=0)  # (B*R, K)
    mask = torch.arange(config.max_new_tokens, device=lengths.device) < lengths.reshape(-1, 1)  # (B*R, L)
    per_token = M.token_posterior(doc_lp.reshape(batch * ret, docs, -1), flat_prior, mask)  # (B*R, L, K)
    return Generation(
        sequences=_as_lists(found.tokens[:, :ret], lengths),
        scores=found.logprob[:, :ret],
        doc_logprior=doc_logprior,
        passage_logprobs=passage,
        doc_logposterior=torch.log_softmax(doc_logprior[:, None] + passage, dim=-1),
        token_doc_logposterior=per_token.view(batch, ret, -1, docs),
    )


@dataclass(frozen=True)
class TokenStep:
    """One step of streamed RAG-Token greedy decoding for B questions (rag_token_greedy_stream)."""

    step: int  # i, from 0
    tokens: Tensor  # (B,) the token each question chose at step i (pad where it had already ended)
    generated: Tensor  # (B,) bool: question b generated tokens[b] at step i (its eos included)
    token_doc_logposterior: Tensor  # (B, K) log p(z_i | x, y_<=i): this token's passage posterior (Figure 2)
    doc_logposterior: Tensor  # (B, K) log p(z | x, y_<=i): Bayes over the passages given the answer so far


@torch.no_grad()
def rag_token_greedy_stream(gen: Any, prefix: Prefix, doc_logprior: Tensor, config: DecodingConfig,
                            options: SearchOptions = SearchOptions()) -> Stream[TokenStep, None, Generation]:
    """RAG-Token greedy decoding, one TokenStep per generated position, each handed out before the next
    forward runs; returns the Generation, which equals rag_token_generate's (the same search loop)."""
    if config.num_beams != 1 or config.num_return_sequences != 1:
        raise ValueError("streaming decodes greedily: num_beams and num_return_sequences must be 1")
    batch, docs = doc_logprior.shape
    stepper = _Stepper(gen, prefix, batch, docs, doc_logprior, room=config.max_new_tokens)
    steps = _greedy_steps(stepper, _rules(gen, config, options))
    answered = doc_logprior.new_zeros(batch, docs)  # (B, K) log p(y_<=i | x, z)
    while True:
        try:
            found = next(steps)
        except StopIteration as done:
            return _token_generation(done.value, doc_logprior, config)
        answered = answered + found.doc_logprobs  # 0 once a question has ended
        per_token = M.token_posterior(found.doc_logprobs[:, :, None], doc_logprior, found.generated[:, None])
        yield TokenStep(found.step, found.tokens, found.generated, per_token[:, 0],  # (B, K)
                        torch.log_softmax(doc_logprior + answered, dim=-1))  # fmt: skip


@torch.no_grad()
def sequence_candidates(gen: Any, prefix: Prefix, doc_logprior: Tensor, config: DecodingConfig,
                        options: SearchOptions = SearchOptions()) -> Candidates:
    """Beam search under each passage, union of hypotheses per question (first occurrence order,
    passage-major as transformers), scored under every passage ("thorough") or only where in-beam ("fast")."""
    batch, docs = doc_logprior.shape
    found = _search(gen, prefix, batch * docs, 1, None, config, options)
    seqs = _as_lists(found.tokens, found.lengths)  # (B*K, n, len)
    # only real beam scores count as in-beam: transformers' padding beams carry -1e9, masked eos -inf
    valid = (found.score > _BLOCKED / 10).tolist()
    logprob = found.logprob.tolist()
    sequences, scored, in_beam = [], [], []
    for b in range(batch):
        index: dict[tuple[int, ...], int] = {}
        ordered: list[list[int]] = []
        known: dict[tuple[int, int], float] = {}
        for z in range(docs):
            for r, seq in enumerate(seqs[b * docs + z]):
                if not seq:  # a finished-pool slot never filled (more beams than sequences)
                    continue
                key = tuple(seq)
                if key not in index or not config.dedup:
                    index[key] = len(ordered)
                    ordered.append(seq)
                if valid[b * docs + z][r]:
                    c = index[key]
                    known[(c, z)] = max(known.get((c, z), float("-inf")), logprob[b * docs + z][r])
        lp = torch.full((len(ordered), docs), float("-inf"), device=doc_logprior.device)
        hit = torch.zeros(len(ordered), docs, dtype=torch.bool, device=doc_logprior.device)
        for (c, z), value in known.items():
            lp[c, z], hit[c, z] = value, True
        if not config.dedup:  # a duplicate is in z's beam if any copy of it is
            _share_duplicates(ordered, lp, hit)
        sequences.append(ordered)
        scored.append(lp)
        in_beam.append(hit)
    if config.decoding == "thorough":
        _rescore(gen, prefix, sequences, scored, in_beam, docs)
    return Candidates(sequences, scored, in_beam)


def _share_duplicates(ordered: list[list[int]], lp: Tensor, hit: Tensor) -> None:
    groups: dict[tuple[int, ...], list[int]] = {}
    for c, seq in enumerate(ordered):
        groups.setdefault(tuple(seq), []).append(c)
    for members in groups.values():
        lp[members] = lp[members].max(0).values
        hit[members] = hit[members].any(0)


def _rescore(gen: Any, prefix: Prefix, sequences: list[list[list[int]]], scored: list[Tensor],
             in_beam: list[Tensor], docs: int) -> None:
    """Fill log p(y|x,z) for the (hypothesis, passage) pairs outside z's beam: teacher-forced on the prefix,
    in passes of hypotheses of similar length (_length_chunks), each padded only to its own longest."""
    todo = [(b, c, z) for b, hit in enumerate(in_beam) for c, z in (~hit).nonzero().tolist()]
    if not todo:
        return
    if hasattr(gen, "hypotheses_logprobs"):  # causal: each prompt row's hypotheses as one trie
        _rescore_by_row(gen, prefix, sequences, scored, todo, docs)
        return
    todo.sort(key=lambda item: len(sequences[item[0]][item[1]]))
    lengths = [len(sequences[b][c]) for b, c, _ in todo]
    device = scored[0].device
    for start, end in _length_chunks(lengths, max(1, _ROWS_PER_PASS // gen.vocab_size)):
        part, width = todo[start:end], lengths[end - 1]
        ids = torch.full((len(part), width), gen.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(part), width, dtype=torch.bool)
        for n, (b, c, _) in enumerate(part):
            seq = sequences[b][c]
            ids[n, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[n, : len(seq)] = True
        rows = torch.tensor([b * docs + z for b, _, z in part], device=device)
        picked = gen.target_token_logprobs(prefix, rows, TargetBatch(ids.to(device), mask.to(device)))  # (N, T)
        for (b, c, z), value in zip(part, picked.sum(-1).tolist(), strict=True):
            scored[b][c, z] = value


def _rescore_by_row(gen: Any, prefix: Prefix, sequences: list[list[list[int]]], scored: list[Tensor],
                    todo: list[tuple[int, int, int]], docs: int) -> None:
    """_rescore through gen.hypotheses_logprobs: the hypotheses to score under each prompt row b*K + z
    together (their shared prefixes once), rows in passes of at most _ROWS_PER_PASS logits."""
    groups: dict[tuple[int, int], list[int]] = {}
    for b, c, z in todo:
        groups.setdefault((b, z), []).append(c)
    keys = sorted(groups, key=lambda key: sum(len(sequences[key[0]][c]) for c in groups[key]))
    sizes = [sum(len(sequences[b][c]) for c in groups[(b, z)]) for b, z in keys]  # bounds the trie's nodes
    budget, device, start = max(1, _ROWS_PER_PASS // gen.vocab_size), scored[0].device, 0
    while start < len(keys):
        end = start + 1
        while end < len(keys) and (end + 1 - start) * sizes[end] <= budget:
            end += 1
        part = keys[start:end]
        rows = torch.tensor([b * docs + z for b, z in part], device=device)
        values = gen.hypotheses_logprobs(prefix, rows, [[sequences[b][c] for c in groups[(b, z)]] for b, z in part])
        for (b, z), row_values in zip(part, values, strict=True):
            for c, value in zip(groups[(b, z)], row_values, strict=True):
                scored[b][c, z] = value
        start = end


_PASS_COST = 32  # a forward's fixed cost (weights read, per-layer overhead) in padded target positions


def _length_chunks(lengths: list[int], positions: int) -> list[tuple[int, int]]:
    """Split rows sorted by length into contiguous passes [start, end) that minimise the sum over passes
    of _PASS_COST + rows * longest (exact, by dynamic programming), with rows * longest <= positions
    (memory: (rows, longest, V) logits)."""
    n = len(lengths)
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest split of the first j rows
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(end - 1, -1, -1):
            if (end - start) * lengths[end - 1] > positions and end - start > 1:
                break
            cost = best[start] + _PASS_COST + (end - start) * lengths[end - 1]
            if cost < best[end]:
                best[end], cut[end] = cost, start
    chunks, end = [], n
    while end:
        chunks.append((cut[end], end))
        end = cut[end]
    return chunks[::-1]


@torch.no_grad()
def rag_sequence_generate(gen: Any, prefix: Prefix, doc_logprior: Tensor, config: DecodingConfig,
                          options: SearchOptions = SearchOptions()) -> Generation:
    """RAG-Sequence decoding ("thorough" or "fast", config.decoding): the best R of the candidates by
    log p(y|x) = logsumexp_z [log p(z|x) + log p(y|x,z)] (eq. 1)."""
    cands = sequence_candidates(gen, prefix, doc_logprior, config, options)
    batch, docs = doc_logprior.shape
    ret = config.num_return_sequences
    scores = torch.full((batch, ret), float("-inf"), device=doc_logprior.device)
    passage = torch.full((batch, ret, docs), float("-inf"), device=doc_logprior.device)
    posterior = torch.full_like(passage, float("-inf"))
    sequences: list[list[list[int]]] = []
    for b in range(batch):
        joint = doc_logprior[b] + cands.passage_logprobs[b]  # (n_b, K)
        total = torch.logsumexp(joint, dim=1)  # (n_b,)
        n = min(ret, total.shape[0])
        best = torch.topk(total, n)[1]  # transformers ranks with topk too
        sequences.append([cands.sequences[b][c] for c in best.tolist()])
        scores[b, :n] = total[best]
        passage[b, :n] = cands.passage_logprobs[b][best]
        posterior[b, :n] = torch.log_softmax(joint[best], dim=1)
    return Generation(sequences, scores, doc_logprior, passage, posterior, None)


def generate(gen: Any, prefix: Prefix, doc_logprior: Tensor, kind: M.Kind, config: DecodingConfig,
             options: SearchOptions = SearchOptions()) -> Generation:
    """Decode with RAG-Token or RAG-Sequence; prefix holds B*K rows (row b*K + z), doc_logprior (B, K)."""
    fn = rag_token_generate if kind == "token" else rag_sequence_generate
    return fn(gen, prefix, doc_logprior, config, options)


def _prefix(gen: Any, questions: list[str], passages: list[list[tuple[str, str]]], doc_scores: Tensor,
            k: int | None) -> tuple[Prefix, Tensor]:
    """The generator's prefix over the top k passages (B*K rows) and log p(z|x) (B, K)."""
    k = doc_scores.shape[1] if k is None else k
    if not 1 <= k <= doc_scores.shape[1]:
        raise ValueError(f"k must be in 1..{doc_scores.shape[1]} (the passages given), got {k}")
    prefix = gen.encode_prefix(gen.format_inputs(questions, [p[:k] for p in passages]))
    return prefix, M.doc_logprior(doc_scores[:, :k])


@torch.no_grad()
def answer(gen: Any, questions: list[str], passages: list[list[tuple[str, str]]], doc_scores: Tensor,
           kind: M.Kind, config: DecodingConfig, k: int | None = None,
           options: SearchOptions = SearchOptions()) -> Generation:
    """From retrieved passages (title, text) and their scores q(x).d(z) (B, K'), best first: decode with
    the top k (default all K'); the generator's input formatting and prefix encoding happen here."""
    prefix, prior = _prefix(gen, questions, passages, doc_scores, k)
    return generate(gen, prefix, prior, kind, config, options)


def answer_stream(gen: Any, questions: list[str], passages: list[list[tuple[str, str]]], doc_scores: Tensor,
                  config: DecodingConfig, k: int | None = None,
                  options: SearchOptions = SearchOptions()) -> Stream[TokenStep, None, Generation]:
    """`answer` for RAG-Token greedy, streamed: TokenSteps, then (returned) the same Generation."""
    with torch.no_grad():
        prefix, prior = _prefix(gen, questions, passages, doc_scores, k)
    return (yield from rag_token_greedy_stream(gen, prefix, prior, config, options))
