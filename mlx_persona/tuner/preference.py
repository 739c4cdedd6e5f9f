"""Preference training: DPO (sigmoid and IPO losses) and ORPO, as a ``loss=`` and a data set for the one
training loop (:func:`mlx_persona.tuner.trainer.train`).

A batch of B pairs is 2B sequences, the chosen replies first, then the rejected ones; the loss positions
are each reply's tokens and its ``<end_of_turn>``. A sequence's log-probability is the sum of its reply
tokens' log-probabilities, taken through the fused, vocabulary-chunked LM head of SFT
(:func:`mlx_persona.tuner.losses.token_losses`: no ``[tokens x vocab]`` tensor; the gradient flows through
its VJP). With ``c``, ``r`` the policy's summed log-probabilities of the chosen and rejected reply, ``c0``,
``r0`` the reference's and ``nc``, ``nr`` their reply tokens, each pair's loss is (as TRL 1.16 defines them):

- DPO, sigmoid: ``-log sigmoid(beta * ((c - c0) - (r - r0)))`` (Rafailov et al. 2023);
- DPO, IPO: ``((c - c0) / nc - (r - r0) / nr - 1 / (2 beta))^2``: the log-ratios averaged per reply token,
  as TRL does (Azar et al. 2023 write them summed; TRL's note says the authors' results used the mean);
- ORPO: ``-c / nc - lambda * log sigmoid(log odds)``, with ``log odds = (a - b) - (log(1 - e^a) -
  log(1 - e^b))`` of the mean log-probabilities ``a = c / nc``, ``b = r / nr`` (Hong et al. 2024). The NLL
  term is the chosen reply's mean over its tokens (the paper's L_SFT), averaged over pairs; TRL's takes
  the cross-entropy over the whole chosen sequences, prompt included, averaged over the batch's tokens.

The loss of a step is the mean over its pairs. DPO's reference log-probabilities are computed once, before
the first step, by the model training starts from (base plus the starting adapter, dropout off) and kept
with the data; a resumed run computes them again from the same start, deterministically, and the data's
fingerprint covers them, so a changed reference stops a resume as changed data does.
"""

from __future__ import annotations

import hashlib
import math

import mlx.core as mx
import numpy as np

from mlx_persona.data.pairs import EncodedPairs
from mlx_persona.tuner.batching import Batch, batch_plan, collate
from mlx_persona.tuner.losses import token_losses


def sequence_logps(model, inputs, targets, positions, weights, chunk: int):
    """Per-sequence sums of the log-probabilities at the loss positions, and their counts.

    Returns:
        ``(logps, counts)``, each [B] float32 for the B rows of `inputs`.
    """
    logp = -token_losses(model, inputs, targets, positions, chunk) * weights
    rows = positions // inputs.shape[1]
    onehot = (rows[:, None] == mx.arange(inputs.shape[0])[None, :]).astype(mx.float32) * weights[:, None]
    return logp @ onehot, weights @ onehot


def _log_sigmoid(x):
    return -mx.logaddexp(mx.zeros_like(x), -x)


def _log1mexp(x):
    """``log(1 - exp(x))`` for x < 0, accurate on both sides of -log 2 (Maechler 2012)."""
    x = mx.minimum(x, -1e-20)
    # Each branch sees only its own side of -log 2: `where` differentiates both, and log1p(-exp(x)) at x near
    # 0 (a reply the model is sure of; a zero-weight stand-in pair) has an infinite slope, and inf * 0 = NaN.
    near = mx.log(-mx.expm1(mx.maximum(x, -math.log(2))))
    far = mx.log1p(-mx.exp(mx.minimum(x, -math.log(2))))
    return mx.where(x > -math.log(2), near, far)


class PreferenceLoss:
    """The ``loss=`` of :func:`~mlx_persona.tuner.trainer.train` for ``method`` ``dpo`` or ``orpo``.

    Called as ``loss(model, inputs, targets, positions, weights, denom, ref_chosen, ref_rejected, pair_weight,
    chunk=)`` on a batch of :meth:`PreferenceData.batching`; returns ``(sum of the pairs' losses / denom,
    loss tokens, stats)``, `stats` the sums named by :attr:`stat_names` (see :meth:`report`).
    """

    def __init__(self, method: str, beta: float = 0.1, loss: str = "sigmoid", orpo_lambda: float = 0.1):
        if method not in ("dpo", "orpo") or loss not in ("sigmoid", "ipo"):
            raise ValueError(f"no preference loss {method}/{loss}")
        self.method, self.beta, self.kind, self.orpo_lambda = method, beta, loss, orpo_lambda
        extra = ("logp_chosen", "logp_rejected") if method == "dpo" else ("nll", "log_odds")
        self.stat_names = ("pairs", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", *extra)

    def pair_losses(self, logps, counts, ref_chosen, ref_rejected):
        """Each pair's loss and its ``(chosen reward, rejected reward, extra stats)``, from the 2B sequences'
        summed log-probabilities and counts (chosen rows first)."""
        b = logps.shape[0] // 2
        c, r = logps[:b], logps[b:]
        nc, nr = mx.maximum(counts[:b], 1), mx.maximum(counts[b:], 1)
        if self.method == "orpo":
            a, bb = c / nc, r / nr
            log_odds = (a - bb) - (_log1mexp(a) - _log1mexp(bb))
            ratio = _log_sigmoid(log_odds)
            return -a - self.orpo_lambda * ratio, (self.orpo_lambda * a, self.orpo_lambda * bb, (-a, log_odds))
        dc, dr = c - ref_chosen, r - ref_rejected
        if self.kind == "sigmoid":
            losses = -_log_sigmoid(self.beta * (dc - dr))
        else:
            losses = (dc / nc - dr / nr - 1 / (2 * self.beta)) ** 2
        return losses, (self.beta * dc, self.beta * dr, (c, r))

    def __call__(self, model, inputs, targets, positions, weights, denom, ref_chosen, ref_rejected, pair_weight,
                 chunk: int = 8192):
        logps, counts = sequence_logps(model, inputs, targets, positions, weights, chunk)
        losses, (good, bad, extra) = self.pair_losses(logps, counts, ref_chosen, ref_rejected)
        w = pair_weight
        sg = mx.stop_gradient
        stats = mx.stack([w.sum(), (w * sg(good)).sum(), (w * sg(bad)).sum(), (w * sg(good - bad)).sum(),
                          (w * (sg(good) > sg(bad))).sum(), *((w * sg(x)).sum() for x in extra)])
        return (losses * w).sum() / denom, weights.sum(), stats

    def report(self, sums: dict) -> dict:
        """Means over the pairs of the summed stats: ``reward_chosen`` / ``reward_rejected`` (DPO: beta times
        the log-ratio to the reference; ORPO: lambda times the mean log-probability), ``reward_margin``,
        ``reward_accuracy`` (the share of pairs whose chosen reward is higher), and DPO's summed
        log-probabilities or ORPO's NLL and log odds."""
        n = max(sums.get("pairs", 0.0), 1e-12)
        return {k: v / n for k, v in sums.items() if k != "pairs"}


class PreferenceData:
    """Encoded pairs and (DPO) their reference log-probabilities, batched for the training loop.

    Args:
        encoded: from :func:`mlx_persona.data.pairs.encode_pairs`.
        reference: [pairs, 2] float32 reference log-probabilities (chosen, rejected); None: zeros (ORPO).
    """

    def __init__(self, encoded: EncodedPairs, reference: np.ndarray | None = None):
        self.encoded = encoded
        n = len(encoded)
        self.reference = np.zeros((n, 2), np.float32) if reference is None else np.asarray(reference, np.float32)
        self.report = encoded.report

    def __len__(self) -> int:
        return len(self.encoded)

    def lengths(self) -> list[int]:
        """A pair's length for batching: its longer sequence."""
        e = self.encoded
        return [max(len(c), len(r)) for c, r in zip(e.chosen, e.rejected)]

    def collate(self, idx: list[int], on: bool = True) -> Batch:
        """The pairs `idx` as one batch of 2B sequences (chosen first); `on` False: every weight 0."""
        e = self.encoded
        masks = [e.chosen_masks[i] for i in idx] + [e.rejected_masks[i] for i in idx]
        b = collate([e.chosen[i] for i in idx] + [e.rejected[i] for i in idx],
                    masks if on else [np.zeros_like(m) for m in masks])
        ref = self.reference[idx]
        b.extra = (ref[:, 0].copy(), ref[:, 1].copy(), np.full(len(idx), float(on), np.float32))
        return b

    def batching(self, rank: int, size: int):
        """What ``batching.iterate_batches`` needs: lengths, a unit per pair (the loss is the mean over
        pairs), and this rank's slice of a global batch. A rank left without pairs gets the batch's first
        pair with every weight 0, so that it still joins the all-reduce, adding exactly zero."""

        def take(idx):
            mine = idx[rank::size]
            if mine:
                return self.collate(mine)
            stand_in = self.collate(idx[:1], on=False)
            stand_in.n_tokens = 0
            return stand_in

        return self.lengths(), [1] * len(self), take

    def fingerprint(self) -> str:
        """A fingerprint of the tokens, masks and reference log-probabilities (what a resume must match)."""
        h = hashlib.sha256()
        e = self.encoded
        for seqs in zip(e.chosen, e.chosen_masks, e.rejected, e.rejected_masks):
            for a in seqs:
                h.update(np.int64(len(a)).tobytes() + a.astype(np.int32).tobytes())
        h.update(self.reference.tobytes())
        return h.hexdigest()[:16]


def reference_logps(model, encoded: EncodedPairs, batch_size: int, chunk: int) -> np.ndarray:
    """The summed reply log-probabilities of every pair under `model` as it is now (dropout off).

    Returns:
        [pairs, 2] float32: (chosen, rejected).
    """
    data = PreferenceData(encoded)
    out = np.zeros((len(encoded), 2), np.float32)
    was_training = model.training
    model.eval()
    for idx in batch_plan(data.lengths(), batch_size):
        b = data.collate(idx)
        logps, _ = sequence_logps(model, mx.array(b.inputs), mx.array(b.targets), mx.array(b.positions),
                                  mx.array(b.weights), chunk)
        got = np.array(logps).reshape(2, len(idx)).T
        out[idx] = got
    if was_training:
        model.train()
    return out


def make_evaluate(loss: PreferenceLoss):
    """The validation loss for pairs: the mean pair loss over a :class:`PreferenceData` (the trainer's
    ``evaluate=``)."""

    def evaluate(model, ds, batch_size: int, chunk: int, max_batches: int = -1, shard: tuple[int, int] = (0, 1)):
        plan = batch_plan(ds.lengths(), batch_size, shard=shard)
        if max_batches > 0:
            plan = plan[:max_batches]
        total, count, one = mx.array(0.0), mx.array(0.0), mx.array(1.0)
        for idx in plan:
            if not idx:
                continue
            b = ds.collate(idx)
            value, _, stats = loss(model, mx.array(b.inputs), mx.array(b.targets), mx.array(b.positions),
                                   mx.array(b.weights), one, *(mx.array(x) for x in b.extra), chunk=chunk)
            total, count = total + value, count + stats[0]
            mx.eval(total, count)
        if shard[1] > 1:
            total, count = mx.distributed.all_sum(total), mx.distributed.all_sum(count)
        return (total / mx.maximum(count, 1)).item()

    return evaluate
