"""Log-probabilities of the tokens the engine emits: the raw log-softmax of the model's float32 logits.

What a request that asks for logprobs gets per emitted token: the token's own log-probability and its
`top` most likely alternatives (0..20), all taken from the model's logits *before* temperature, penalties,
logit_bias and grammar masks (vLLM's default: well defined at temperature 0 too).

Exactness. A low-precision head (bf16, int8 or int4) gives logits that are off by up to a few tenths; only
its top candidates are rescored in float32 for sampling (models/llama.py: compute_logits). A log-softmax
over those would be wrong in two ways: the normalizer (logsumexp over the whole vocabulary) mixes in every
low-precision logit, and the top 20 of the low-precision head need not be the float32 head's top 20. So
for the rows of requests that ask for logprobs, and only those, the runner computes the full float32 head
(`exact_logits`: one fixed-order dot per vocabulary entry, the same kernel and bits as the rescoring), and
everything here is computed from that row. The rows of other requests are never touched, and sampling
still reads the logits it always read, so a request's tokens are the same with and without logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs


@dataclass(frozen=True, slots=True)
class SampledLogprob:
    """One emitted token's log-probability and the `top` most likely tokens (id, logprob), most likely
    first (lower id first on ties)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def sampled_logprobs(exact: torch.Tensor, tokens: list[int], num_top: list[int]) -> list[SampledLogprob]:
    """exact: float32 logits [rows, vocab] (the full float32 head); tokens: each row's emitted token;
    num_top: each row's number of alternatives (0..MAX_TOP_LOGPROBS)."""
    assert exact.dim() == 2 and exact.shape[0] == len(tokens) == len(num_top)
    if not tokens:
        return []
    logprobs = torch.log_softmax(exact.float(), dim=-1)
    out: list[SampledLogprob] = []
    for row, (token, k) in enumerate(zip(tokens, num_top, strict=True)):
        values = logprobs[row]
        top: tuple[tuple[int, float], ...] = ()
        if k > 0:
            # Sort by value descending, then id ascending: deterministic on ties (topk's order is not).
            best = values.topk(min(k + 8, values.numel()))  # a margin so that ties at the k-th place sort by id
            pairs = sorted(zip(best.indices.tolist(), best.values.tolist(), strict=True), key=lambda p: (-p[1], p[0]))
            top = tuple(pairs[:k])
        out.append(SampledLogprob(token, float(values[token]), top))
    return out
