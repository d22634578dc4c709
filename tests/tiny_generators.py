"""Tiny random generators (BART, T5, Llama with and without a chat template, GPT-2) built offline.

Shared by the generator, model, decoding and reference tests: a word-level tokenizer trained on a
fixed word list (so every test word is one token) and random configurations a few thousand
parameters in size. Seeded: the same call gives the same weights.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from rag.config import GeneratorConfig
from rag.generators import CausalGenerator, Generator, Seq2SeqGenerator

WORDS = (
    "the a of is what who where capital city country river angola luanda paris france berlin germany "
    "lisbon portugal africa europe largest in on and to was born wrote book year / // ? . , : "
    "question answer passage yes no true false one two three system user assistant"
).split()

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def word_tokenizer(specials: list[str], chat: bool = False) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: `specials` get ids 0.. in order (BART: <s> <pad> </s> <unk>; T5: <pad> </s> <unk>)."""
    extra = ["<|im_start|>", "<|im_end|>"] if chat else []
    vocab = {tok: i for i, tok in enumerate([*specials, *extra, *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    names = {"<s>": "bos_token", "<pad>": "pad_token", "</s>": "eos_token", "<unk>": "unk_token"}
    special_kwargs = {names[s]: s for s in specials}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special_kwargs)
    if chat:
        tokenizer.add_special_tokens({"additional_special_tokens": extra})
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_bart(seed: int = 0, d_model: int = 24) -> Seq2SeqGenerator:
    tokenizer = word_tokenizer(["<s>", "<pad>", "</s>", "<unk>"])
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=d_model,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=128,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
    )
    model = BartForConditionalGeneration(config).eval()
    return Seq2SeqGenerator(model, tokenizer, GeneratorConfig(path="tiny-bart", max_input_tokens=96))


def tiny_t5(seed: int = 0) -> Seq2SeqGenerator:
    tokenizer = word_tokenizer(["<pad>", "</s>", "<unk>"])
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=24,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    model = T5ForConditionalGeneration(config).eval()
    return Seq2SeqGenerator(model, tokenizer, GeneratorConfig(path="tiny-t5", max_input_tokens=96))


def _llama(tokenizer: PreTrainedTokenizerFast, seed: int, positions: int, pad: int, eos: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        bos_token_id=0,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    return LlamaForCausalLM(config).eval()


def tiny_llama(seed: int = 0, chat: bool = False) -> CausalGenerator:
    tokenizer = word_tokenizer(["<s>", "<pad>", "</s>", "<unk>"], chat=chat)
    model = _llama(tokenizer, seed, positions=256, pad=1, eos=2)
    prompt = "chat" if chat else "plain"
    return CausalGenerator(
        model, tokenizer, GeneratorConfig(path="tiny-llama", max_input_tokens=96, prompt=prompt)
    )


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (newline is a token of its own, as in SmolLM2) trained on WORDS."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["</s>"], initial_alphabet=alphabet)
    backend.train_from_iterator([" ".join(WORDS)] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")


def tiny_short_answer_llama(seed: int = 0) -> CausalGenerator:
    """The default causal prompt ("short-answer") on a byte-level tokenizer: answers end at a newline."""
    tokenizer = byte_level_tokenizer()
    model = _llama(tokenizer, seed, positions=512, pad=0, eos=0)
    return CausalGenerator(model, tokenizer, GeneratorConfig(path="tiny-short", max_input_tokens=400))


def tiny_gpt2(seed: int = 0) -> CausalGenerator:
    # GPT-2 has no pad token: the generator pads with eos, as for the real checkpoints.
    tokenizer = word_tokenizer(["</s>", "<unk>"])
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=256,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).eval()
    return CausalGenerator(
        model, tokenizer, GeneratorConfig(path="tiny-gpt2", max_input_tokens=96, prompt="plain")
    )


def tiny_generator(name: str, seed: int = 0) -> Generator:
    builders = {
        "bart": lambda: tiny_bart(seed),
        "t5": lambda: tiny_t5(seed),
        "llama": lambda: tiny_llama(seed),
        "llama-chat": lambda: tiny_llama(seed, chat=True),
        "llama-short-answer": lambda: tiny_short_answer_llama(seed),
        "gpt2": lambda: tiny_gpt2(seed),
    }
    return builders[name]()
