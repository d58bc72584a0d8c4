"""A byte-level tokenizer built in memory, for tiny test models that have no tokenizer files."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


def byte_tokenizer(add_bos: bool = True, add_eos: bool = False) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per byte (vocabulary 260: 4 special tokens, then 256 bytes).

    Any text round-trips through it, so tiny models built from a config can be trained and evaluated
    on real text without downloading anything.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):  # sorted: the set order varies by process
        vocab.setdefault(char, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    template = " ".join([*(["<bos>"] if add_bos else []), "$A", *(["<eos>"] if add_eos else [])])
    core.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in ("<bos>", "<eos>")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )
