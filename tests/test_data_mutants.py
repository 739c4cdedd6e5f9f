"""Known answers for data.py's loss-mask functions where the other tests do not look, written to kill the
mutants they let live (`make mutate TARGETS=data`): a conversation that ends with a user turn, a tokenizer
whose post-processor adds a bos of its own (as Gemma's does), tokenizers without character offsets, and
the two halves of the prefix-stability check."""

from types import SimpleNamespace

import pytest

from mlx_persona.data import masks as data
from mlx_persona.data import DataError, Example, encode_example
from mlx_persona.models import load_model


@pytest.fixture
def tok(tiny_path):
    return load_model(tiny_path)[1]


def _split(tok, ids, mask):
    hf = data._hf(tok)
    return hf.decode([i for i, m in zip(ids, mask) if m]), hf.decode([i for i, m in zip(ids, mask) if not m])


def test_only_assistant_turns_carry_loss_even_before_a_final_user_turn(tok):
    # The loader refuses such a conversation, but encode_example takes any Example: the loss is on the
    # reply and its <end_of_turn>, not on the user turn after it.
    ex = Example(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                           {"role": "user", "content": "Bye"}], source="mem")
    ids, mask = encode_example(tok, ex)
    on, off = _split(tok, ids, mask)
    assert on == "Hello!<end_of_turn>"
    assert off == ("<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
                   "\n<start_of_turn>user\nBye<end_of_turn>\n")


def test_a_tokenizer_that_adds_bos_itself_does_not_get_a_second_one(tok):
    from tokenizers.processors import TemplateProcessing

    hf = data._hf(tok)
    ex = Example(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                 source="mem")
    plain_ids, plain_mask = encode_example(tok, ex)
    bos = hf.convert_tokens_to_ids("<bos>")
    hf.backend_tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    assert hf("Hi")["input_ids"][0] == bos  # the post-processor is live (Gemma's tokenizer.json has one)
    ids, mask = encode_example(tok, ex)
    assert (ids, mask) == (plain_ids, plain_mask)
    assert ids[0] == bos and ids.count(bos) == 1


@pytest.mark.parametrize("stand_in", [SimpleNamespace(), SimpleNamespace(is_fast=False)],
                         ids=["no is_fast", "is_fast False"])
def test_a_tokenizer_without_offsets_is_refused(stand_in):
    with pytest.raises(TypeError, match="SimpleNamespace is not a fast tokenizer; loss masks need character offsets"):
        data._tokenize_with_offsets(stand_in, "Hello")


def test_prefix_check_needs_both_prefixes():
    data._check_prefix("ab", "abc", "abcd", 1, "src")  # both hold: no error
    data._check_prefix("ab", "ab", "ab", 1, "src")
    for before, through, full in (("ab", "abc", "abX"), ("ab", "aXc", "aXcd"), ("ab", "Xbc", "Ybcd")):
        with pytest.raises(DataError, match=r"src: the chat template is not prefix-stable at messages\[3\]"):
            data._check_prefix(before, through, full, 3, "src")
