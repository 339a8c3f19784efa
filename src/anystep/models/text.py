"""The text path: a locally built word-level tokenizer and a tiny ``UMT5EncoderModel``.

The toy world uses the same classes and the same encoding rule as Wan / AnyFlow pipelines
(``AutoTokenizer`` + ``UMT5EncoderModel``; embeddings cut at the true sequence length and
zero-padded to ``max_sequence_length``, 512 by default), so the stock pipelines' defaults are
right for toy folders. Our own code encodes the toy's short prompts to ``TOY_TEXT_ROWS`` compact
rows instead, which :mod:`anystep.models.padded_text` makes attend exactly like 512 zero-padded
ones. Nothing is fetched from a hub.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from anystep.data.moving_digits import vocabulary
from anystep.errors import UserError
from anystep.models.padded_text import WAN_TEXT_LENGTH, text_length

# Rows our code encodes a toy prompt to (the world's prompts are 5 words + </s>); the last row is
# always a pad, which is how the padded-text attention finds the pads.
TOY_TEXT_ROWS = 8
# A word-level vocabulary this small is the toy's, never a real T5 tokenizer's.
_TOY_VOCAB_LIMIT = 1000
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]


class PromptTooLongError(UserError, ValueError):
    """A prompt that would fill the compact rows: one line for the user, a ValueError for callers."""


def build_word_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A lower-casing whitespace word tokenizer over ``words`` that appends ``</s>``, like T5's."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    words = list(dict.fromkeys(words or vocabulary()))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=WAN_TEXT_LENGTH,
    )


def build_tiny_umt5(vocab_size: int, d_model: int = 64, num_layers: int = 2, seed: int = 0) -> UMT5EncoderModel:
    cfg = UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=d_model * 2,
        num_layers=num_layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return UMT5EncoderModel(cfg)


def encode_prompts(
    tokenizer,
    text_encoder: UMT5EncoderModel,
    prompts: list[str],
    max_sequence_length: int = TOY_TEXT_ROWS,
) -> torch.Tensor:
    """Prompt embeddings as diffusers' Wan/AnyFlow ``_get_t5_prompt_embeds`` makes them, zero-padded
    to ``max_sequence_length`` rows.

    Fewer rows than Wan's 512 is the compact form: a prompt must then leave at least one pad row
    (a longer one is refused rather than cut, since the stock pipeline would not cut it).
    Differentiable (no ``no_grad`` here), so a teacher can train its text encoder jointly.
    """
    check_prompts_fit(tokenizer, prompts, max_sequence_length)
    inputs = tokenizer(
        [" ".join(p.split()) for p in prompts],
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
    hidden = text_encoder(ids, mask).last_hidden_state
    # Zero every position past the true length, as the pipelines do.
    return hidden * mask.unsqueeze(-1).to(hidden.dtype)


def check_prompts_fit(tokenizer, prompts: list[str], rows: int) -> None:
    """Compact rows (fewer than Wan's 512) must keep a pad row after every prompt."""
    if rows >= WAN_TEXT_LENGTH:
        return
    lengths = [len(ids) for ids in tokenizer([" ".join(p.split()) for p in prompts]).input_ids]
    if lengths and max(lengths) >= rows:
        worst = prompts[lengths.index(max(lengths))]
        raise PromptTooLongError(f"prompt {worst!r} is {max(lengths)} tokens; the toy text path takes at most "
                                 f"{rows - 1} (its prompts read like 'a red three moving left')")


def is_toy_tokenizer(tokenizer) -> bool:
    return len(tokenizer) < _TOY_VOCAB_LIMIT


def text_rows(tokenizer, transformer=None) -> int:
    """Rows our code encodes prompts to: the compact ``TOY_TEXT_ROWS`` for a toy tokenizer feeding
    a transformer with the padded-text attention (without it, compact rows would be another
    conditioning than the stock pipeline's); otherwise the tokenizer's length, at most Wan's 512."""
    if is_toy_tokenizer(tokenizer) and (transformer is None or text_length(transformer) is not None):
        return TOY_TEXT_ROWS
    return int(min(getattr(tokenizer, "model_max_length", WAN_TEXT_LENGTH) or WAN_TEXT_LENGTH, WAN_TEXT_LENGTH))
