"""The toy reads its prompt as Wan's pipelines hand it over (zero-padded to 512 rows), at the cost
of 8 rows: compact text through the padded-text cross-attention equals 512 zero-padded rows through
the stock processor."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from anystep.models.padded_text import WAN_TEXT_LENGTH, pad_logit_bias, text_length, use_padded_text
from anystep.models.students import student_from_teacher
from anystep.errors import UserError
from anystep.models.text import (TOY_TEXT_ROWS, PromptTooLongError, build_tiny_umt5, build_word_tokenizer,
                                 encode_prompts, text_rows)
from anystep.models.toy import TOY_TRANSFORMER, build_toy_transformer
from anystep.models.velocity import flow_map_velocity

TOY_CHANNELS = TOY_TRANSFORMER["in_channels"]  # latent channels of the shipped toy

PROMPTS = ["a red three moving left", "", "a blue zero moving right"]


@pytest.fixture(scope="module")
def text():
    tok = build_word_tokenizer()
    enc = build_tiny_umt5(len(tok), seed=0)
    with torch.no_grad():
        compact = encode_prompts(tok, enc, PROMPTS, TOY_TEXT_ROWS)
        full = encode_prompts(tok, enc, PROMPTS, WAN_TEXT_LENGTH)
    return tok, compact, full


def _stock(model):
    """The same weights with diffusers' own cross-attention processors back."""
    plain = copy.deepcopy(model)
    for block in plain.blocks:
        block.attn2.set_processor(block.attn2.processor.inner)
    plain.__dict__.pop("_anystep_text_length", None)
    return plain


def test_compact_rows_are_the_first_rows_of_the_full_encoding(text):
    tok, compact, full = text
    assert text_rows(tok) == TOY_TEXT_ROWS and tok.model_max_length == WAN_TEXT_LENGTH
    assert compact.shape[1] == TOY_TEXT_ROWS and full.shape[1] == WAN_TEXT_LENGTH
    torch.testing.assert_close(full[:, :TOY_TEXT_ROWS], compact, rtol=1e-5, atol=1e-6)
    assert full[:, TOY_TEXT_ROWS:].abs().max() == 0


def test_the_bias_counts_the_missing_pads(text):
    tok, compact, _ = text
    real = [len(ids) for ids in tok(PROMPTS).input_ids]  # words + </s>
    # The bias is found on projected rows, where a pad is a constant non-zero vector.
    projected = compact @ torch.randn(compact.shape[-1], 16) + torch.randn(16)
    bias = pad_logit_bias(projected, WAN_TEXT_LENGTH)[:, 0, 0]
    for i, n in enumerate(real):
        assert torch.all(bias[i, :n] == 0)
        want = math.log((WAN_TEXT_LENGTH - n) / (TOY_TEXT_ROWS - n))
        torch.testing.assert_close(bias[i, n:], torch.full((TOY_TEXT_ROWS - n,), want))
    assert pad_logit_bias(torch.randn(2, WAN_TEXT_LENGTH, 4)) is None


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_compact_text_equals_wan_padding_through_the_stock_processor(text, kind):
    _, compact, full = text
    torch.manual_seed(0)
    model = build_toy_transformer().eval()
    with torch.no_grad():
        for p in model.parameters():  # a random model's cross-attention is near uniform; sharpen it
            p.add_(torch.randn_like(p) * 0.05)
    if kind == "student":
        model = student_from_teacher(model)
    assert text_length(model) == WAN_TEXT_LENGTH
    stock = _stock(model)
    x = torch.randn(3, TOY_CHANNELS, 7, 8, 8)
    t = torch.tensor([900.0, 500.0, 100.0])

    def run(m, e):
        if kind == "student":
            return flow_map_velocity(m, x.permute(0, 2, 1, 3, 4), t / 1000, t / 2000, e)
        return m(x, t, e).sample

    with torch.no_grad():
        want, got, short, again = run(stock, full), run(model, compact), run(stock, compact), run(model, full)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, want, rtol=0, atol=0)  # 512 rows: nothing added
    # Without the bias the 8 rows are another conditioning: the test can tell them apart.
    assert (short - want).abs().max() > 100 * (got - want).abs().max()


def test_a_prompt_that_fills_the_compact_rows_is_refused(text):
    tok, _, _ = text
    enc = build_tiny_umt5(len(tok), seed=0)
    with pytest.raises(PromptTooLongError, match="at most 7") as err:
        encode_prompts(tok, enc, ["a red three moving left and then up"], TOY_TEXT_ROWS)
    assert isinstance(err.value, UserError)  # one line for the user (the CLI and the studio)


def test_installing_twice_wraps_once():
    model = build_toy_transformer()
    use_padded_text(model)
    assert all(not hasattr(b.attn2.processor.inner, "inner") for b in model.blocks)


def test_backend_settings_reach_the_stock_processor():
    model = build_toy_transformer()
    proc = model.blocks[0].attn2.processor
    proc._attention_backend = "native"
    assert proc.inner._attention_backend == "native" and proc.logical_length == WAN_TEXT_LENGTH


def test_compact_rows_only_where_the_padded_attention_is():
    from diffusers import WanTransformer3DModel

    from anystep.models.toy import TOY_TRANSFORMER

    tok = build_word_tokenizer()
    assert text_rows(tok, build_toy_transformer()) == TOY_TEXT_ROWS
    # A stock transformer would read compact rows as another prompt: it gets Wan's 512.
    assert text_rows(tok, WanTransformer3DModel(**TOY_TRANSFORMER)) == WAN_TEXT_LENGTH
