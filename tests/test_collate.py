"""Known answers for the batch a training step sees: which (input position, target token) pairs carry loss.

A conversation is rendered and masked by the real tiny tokenizer through the real data pipeline
(`data.prepare_dataset`), then collated; the expected pairs are built by hand from the literal
text, one segment at a time: the loss is on every token of each assistant reply and on the
``<end_of_turn>`` that closes it, and on nothing else (not the bos, the system/user turns, the role
headers, nor the newline after ``<end_of_turn>``). Target t is input t + 1, so a loss token at index j
of the example is the target of input position j - 1.
"""

import numpy as np
import pytest

from mlx_persona import data
from mlx_persona.data.tokenizer import unwrap_tokenizer
from mlx_persona.tuner.batching import PAD_LEN_TO, PAD_LOSS_TO, collate, shard_batch
from mlx_persona.models import load_model

SYSTEM, USER1, REPLY1, USER2, REPLY2 = "Be Bluey.", "Hi there", "Hello! Want to play?", "Sure", "Keepy uppy time."
SHORT_USER, SHORT_REPLY = "Bingo?", "Yes!"

# The rendered text, segment by segment, with whether the loss is on it. Gemma 3's template has no
# system role of its own: the system message opens the first user turn, followed by a blank line.
LONG = [
    (f"<bos><start_of_turn>user\n{SYSTEM}\n\n{USER1}<end_of_turn>\n<start_of_turn>model\n", False),
    (REPLY1, True), ("<end_of_turn>", True),
    (f"\n<start_of_turn>user\n{USER2}<end_of_turn>\n<start_of_turn>model\n", False),
    (REPLY2, True), ("<end_of_turn>", True),
    ("\n", False),
]
SHORT = [
    (f"<bos><start_of_turn>user\n{SHORT_USER}<end_of_turn>\n<start_of_turn>model\n", False),
    (SHORT_REPLY, True), ("<end_of_turn>", True),
    ("\n", False),
]


@pytest.fixture(scope="module")
def tok(tiny_path):
    return load_model(tiny_path)[1]


def _examples():
    long = data.Example(messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER1},
                                  {"role": "assistant", "content": REPLY1}, {"role": "user", "content": USER2},
                                  {"role": "assistant", "content": REPLY2}], source="long")
    short = data.Example(messages=[{"role": "user", "content": SHORT_USER},
                                   {"role": "assistant", "content": SHORT_REPLY}], source="short")
    return [long, short]


def _ids(tok, text):
    return list(unwrap_tokenizer(tok)(text, add_special_tokens=False)["input_ids"])


def _expected(tok, segments):
    """(token ids, [(input position, target token)]) built segment by segment from the literal text."""
    ids, pairs = [], []
    for text, on in segments:
        piece = _ids(tok, text)
        for t in piece:
            if on:
                pairs.append((len(ids) - 1, t))
            ids.append(t)
    return ids, pairs


def _pairs(batch, row):
    """The (input position, target token) pairs of `row` where the batch's loss is on."""
    L = batch.inputs.shape[1]
    real = batch.positions[batch.weights > 0]
    return [(int(p % L), int(batch.targets.reshape(-1)[p])) for p in real if p // L == row]


@pytest.fixture(scope="module")
def encoded(tok):
    assert data.template_supports_system(tok)
    ds = data.prepare_dataset(tok, _examples(), max_seq_len=1024)
    assert ds.report["kept"] == 2
    return ds


def test_the_literal_segments_are_what_the_pipeline_renders(tok, encoded):
    """The hand-written text is the real template's rendering, and tokenising it piecewise gives the same ids
    (so the hand-built pairs below are about the same tokens the model trains on)."""
    for ex, segments, ids in zip(_examples(), (LONG, SHORT), encoded.tokens):
        assert data.render(tok, ex) == "".join(t for t, _ in segments)
        assert ids.tolist() == _expected(tok, segments)[0]
    eot = unwrap_tokenizer(tok).convert_tokens_to_ids("<end_of_turn>")
    assert _ids(tok, "<end_of_turn>") == [eot]


def test_single_example_targets_are_exactly_the_replies_and_their_end_of_turn(tok, encoded):
    """One multi-turn conversation: the loss pairs equal the hand-built list, and decoding the targets gives
    the literal replies, each closed by <end_of_turn>."""
    b = collate([encoded.tokens[0]], [encoded.masks[0]])
    ids, want = _expected(tok, LONG)
    assert _pairs(b, 0) == want, "loss pairs differ from the hand-built (position, target) list"
    hf = unwrap_tokenizer(tok)
    targets = [t for _, t in _pairs(b, 0)]
    eot = hf.convert_tokens_to_ids("<end_of_turn>")
    cut = targets.index(eot) + 1
    assert hf.decode(targets[:cut]) == REPLY1 + "<end_of_turn>"
    assert hf.decode(targets[cut:]) == REPLY2 + "<end_of_turn>"
    # Inputs are the sequence without its last token, targets without its first.
    n = len(ids) - 1
    assert b.inputs[0, :n].tolist() == ids[:-1] and b.targets[0, :n].tolist() == ids[1:]
    assert b.n_loss == len(want) == len(_ids(tok, REPLY1)) + len(_ids(tok, REPLY2)) + 2
    assert b.n_tokens == n


def test_batch_of_two_pads_and_flattens_positions(tok, encoded):
    """Two examples of different lengths: inputs/targets padded with zeros to a multiple of PAD_LEN_TO,
    positions are flat indices row * L + column into B*L, weights 1 for real positions and 0 for the padding
    up to a multiple of PAD_LOSS_TO, n_loss / n_tokens count real tokens only."""
    b = collate(encoded.tokens, encoded.masks)
    (long_ids, long_pairs), (short_ids, short_pairs) = _expected(tok, LONG), _expected(tok, SHORT)
    assert len(long_ids) != len(short_ids)
    L = -(-(len(long_ids) - 1) // PAD_LEN_TO) * PAD_LEN_TO
    assert b.inputs.shape == b.targets.shape == (2, L)
    for row, ids in enumerate((long_ids, short_ids)):
        n = len(ids) - 1
        assert b.inputs[row].tolist() == ids[:-1] + [0] * (L - n)
        assert b.targets[row].tolist() == ids[1:] + [0] * (L - n)
    want = [r * L + p for r, pairs in ((0, long_pairs), (1, short_pairs)) for p, _ in pairs]
    n_loss = len(long_pairs) + len(short_pairs)
    assert b.n_loss == n_loss and b.n_tokens == len(long_ids) - 1 + len(short_ids) - 1
    assert len(b.positions) == len(b.weights) == -(-n_loss // PAD_LOSS_TO) * PAD_LOSS_TO
    assert b.positions[:n_loss].tolist() == want
    assert b.weights.tolist() == [1.0] * n_loss + [0.0] * (len(b.weights) - n_loss)
    assert _pairs(b, 0) == long_pairs and _pairs(b, 1) == short_pairs
    assert b.inputs.dtype == b.targets.dtype == b.positions.dtype == np.int32 and b.weights.dtype == np.float32


def test_shard_batch_with_more_ranks_than_examples(tok, encoded):
    """A global batch of 2 over 4 ranks: ranks 0 and 1 get one example each (with exactly its loss pairs);
    ranks 2 and 3 get a stand-in with no loss (weights all 0, n_loss = n_tokens = 0), so the sum over ranks
    is the global batch."""
    (_, long_pairs), (_, short_pairs) = _expected(tok, LONG), _expected(tok, SHORT)
    shards = [shard_batch(encoded.tokens, encoded.masks, [0, 1], rank, 4) for rank in range(4)]
    assert _pairs(shards[0], 0) == long_pairs and _pairs(shards[1], 0) == short_pairs
    for real in shards[:2]:
        assert real.inputs.shape[0] == 1 and real.weights.sum() == real.n_loss > 0
    for stand_in in shards[2:]:
        assert stand_in.inputs.shape[0] == 1
        assert stand_in.n_loss == 0 and stand_in.n_tokens == 0 and not stand_in.weights.any()
    assert sum(s.n_loss for s in shards) == len(long_pairs) + len(short_pairs)
    assert sum(s.n_tokens for s in shards) == collate(encoded.tokens, encoded.masks).n_tokens
    # Two ranks over the same batch: each takes examples rank, rank + size, ...
    halves = [shard_batch(encoded.tokens, encoded.masks, [1, 0], rank, 2) for rank in range(2)]
    assert _pairs(halves[0], 0) == short_pairs and _pairs(halves[1], 0) == long_pairs
