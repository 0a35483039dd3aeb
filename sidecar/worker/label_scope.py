"""Zero-shot out of scope: a novelty in [0, 1] from the label scores alone.

A Classify by labels alone has no examples to compare a text with; what it has is the
model's log-probability of each label as the answer (`labels.score_trie`). The signal
used is the **label mass**: the total probability the model gives to answering with any
of the labels, sum_i P(label_i | prompt). A text the labels cover makes some label a
natural answer; a text about something else leaves the model wanting to say something
not in the list. The mass is divided (in log space) by the labels' mean length in tokens,
so that label sets of long and short names land on one scale, and squashed to [0, 1].

Measured on Banking77 (`scripts/bench-zero-shot-scope`, figures in docs/routing.md) with
SmolLM2-135M, 20 intents as labels, against off-topic questions and against 5 intents
left out:

- the label mass is the best of the free candidates: AUROC 0.74 against off-topic
  questions; the spread of the label distribution (normalised entropy 0.51, 1 - top
  probability 0.53) carries almost nothing, and averaging it in lowered the AUROC (0.70),
  so it is not used;
- nothing here tells a left-out *intent* from the in-scope ones (every candidate below
  0.5, the mass 0.38): the model gives a question about a neighbouring intent confidently
  to the nearest label. That is what examples are for (`sidecar/fewshot/novelty.py`);
- the text's own mean token log-probability needs logits for every prompt row and
  measured worse (AUROC 0.20 against off-topic questions, which are more ordinary text
  than banking questions), so it is not computed.

`features` gives the candidates (the benchmark reports each); `novelty` is what replies carry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Per-token label log-mass (nats per token, negated) mapped to novelty 0.5, and the
# width of the logistic around it: set so that in-scope Banking77 questions centre on
# 0.5 with SmolLM2-135M (median 3.24 nats per token; off-topic questions 3.63). Another
# model puts its mass elsewhere: the scale, and so cloud.classify_none_novelty, is the
# demo model's.
MASS_MID = 3.25
MASS_SCALE = 0.25


@dataclass(frozen=True)
class ScopeFeatures:
    entropy: float  # normalised entropy of the label distribution, [0, 1]
    top: float  # the top normalised probability
    log_mass: float  # log sum_i P(label_i | prompt), <= 0
    per_token: float  # -log_mass / the labels' mean length in tokens, >= 0


def features(logprobs: Sequence[float], lengths: Sequence[int] | None = None) -> ScopeFeatures:
    """The scope features of one answer: each label's log-probability and its length in
    tokens (end-of-turn included; None: 1 each)."""
    if not logprobs:
        raise ValueError("no labels")
    mean_len = sum(lengths) / len(lengths) if lengths else 1.0
    finite = [x for x in logprobs if math.isfinite(x)]
    if not finite:  # every label impossible: nothing the labels cover
        return ScopeFeatures(1.0, 1.0 / len(logprobs), float("-inf"), float("inf"))
    hi = max(finite)
    exps = [math.exp(x - hi) if math.isfinite(x) else 0.0 for x in logprobs]
    total = sum(exps)
    log_mass = min(0.0, hi + math.log(total))
    probs = [e / total for e in exps]
    k = len(probs)
    entropy = -sum(p * math.log(p) for p in probs if p > 0)
    norm = entropy / math.log(k) if k > 1 else 0.0
    per_token = -log_mass / max(1.0, mean_len)
    return ScopeFeatures(min(1.0, max(0.0, norm)), max(probs), log_mass, per_token)


def mass_novelty(per_token: float) -> float:
    """The per-token label mass deficit as a novelty in [0, 1]: near 0 when the model
    readily answers with a label, near 1 when it hardly considers any."""
    if per_token == float("inf"):
        return 1.0
    z = (per_token - MASS_MID) / MASS_SCALE
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))


def novelty(logprobs: Sequence[float], lengths: Sequence[int] | None = None) -> float:
    """How unlike anything the labels cover the text is, in [0, 1] (higher = stranger)."""
    return mass_novelty(features(logprobs, lengths).per_token)
