"""Tokenizers: load one, give it the `<image>` token, padding and our chat template; train a tiny one.

The tiny tokenizer is a byte-level BPE trained on the spot on Vietnamese text: byte-level means any
text round-trips exactly, so Vietnamese diacritics are never lost or normalised away.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vistralv_ray.text.templates import IMAGE_TOKEN

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """A byte-level BPE with Llama's special tokens (<unk>=0, <s>=1, </s>=2), trained on `texts`."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", model_max_length=4096
    )


def load_tokenizer(path: str):
    return AutoTokenizer.from_pretrained(path, use_fast=True)


def prepare_tokenizer(tokenizer, chat_template: str):
    """Add `<image>` (a special token, never split), a pad token, and the chat template. Idempotent."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        # LLaVA pads Llama-family models with <unk>; labels mask padding anyway.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.chat_template = chat_template
    return tokenizer
