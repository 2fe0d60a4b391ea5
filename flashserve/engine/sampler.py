"""Turns a batch of logits into one next token per request.

Order of operations, per row: logit_bias, presence/frequency penalties over
the tokens generated so far, the grammar's token mask (structured output;
while a request still thinks, its grammar waits and only its stop tokens are
masked, so it cannot end before the constrained answer), then greedy argmax
(temperature 0) or temperature + top-p sampling. The processing is batched;
only the final draw runs per row, with the request's own `torch.Generator`, so a seeded request
gives the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import torch

from flashserve.engine.request import Request
from flashserve.kernels import CpuOps, cpu_ops


class Sampler:
    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        assert logits.shape[0] == len(requests)
        if not requests:
            return []
        edited = any(r.params.logit_bias or r.params.uses_penalties or r.constraint is not None for r in requests)
        if edited:
            logits = logits.float().clone()  # the processing below edits rows in place
            logits = self._apply_logit_bias(logits, requests)
            logits = self._apply_penalties(logits, requests)
            self._apply_grammar(logits, requests)
        else:
            logits = logits.float()
        greedy = self._argmax(logits, finite=not edited)
        tokens: list[int] = []
        for row, request in enumerate(requests):
            if request.forced_token_ids:  # e.g. the end-of-thinking marker once the budget is spent
                tokens.append(request.forced_token_ids.pop(0))
            elif request.params.greedy:
                tokens.append(greedy[row])
            else:
                probs = self._probabilities(logits[row], request.params.temperature, request.params.top_p)
                tokens.append(int(torch.multinomial(probs, 1, generator=request.generator).item()))
        return tokens

    @staticmethod
    def _argmax(logits: torch.Tensor, finite: bool) -> list[int]:
        """Each row's first maximal index. The native kernel takes a fifth of torch's time over 32 rows of a
        49k vocabulary; it is built with finite math, so rows with -inf (masks, bans) go to torch."""
        ops = cpu_ops() if finite and CpuOps.supports(logits) and logits.dim() == 2 else None
        top = ops.argmax_rows(logits.contiguous()) if ops is not None else None
        if top is not None:
            return top.tolist()
        return logits.max(dim=-1).indices.tolist()  # max() is argmax's first index in a third of the time

    def _apply_logit_bias(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        rows, cols, vals = [], [], []
        for row, request in enumerate(requests):
            for token_id, bias in request.params.logit_bias.items():
                rows.append(row)
                cols.append(token_id)
                vals.append(bias)
        if rows:
            logits = logits.index_put((torch.tensor(rows), torch.tensor(cols)), torch.tensor(vals), accumulate=True)
        return logits

    def _apply_penalties(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        for row, request in enumerate(requests):
            params = request.params
            if not params.uses_penalties or not request.output_token_ids:
                continue
            counts = torch.bincount(
                torch.tensor(request.output_token_ids), minlength=logits.shape[1]
            )[: logits.shape[1]].float()
            # OpenAI's definition: mu[j] -= c[j] * alpha_frequency + float(c[j] > 0) * alpha_presence
            logits[row] -= counts * params.frequency_penalty + (counts > 0).float() * params.presence_penalty
        return logits

    def _apply_grammar(self, logits: torch.Tensor, requests: list[Request]) -> None:
        rows = []
        for row, request in enumerate(requests):
            if request.constraint is None:
                continue
            if request.in_thinking:
                # The grammar starts after `</think>`; until then the answer it shapes must still come.
                stops = [t for t in request.params.stop_token_ids if t < logits.shape[1]]
                if stops:
                    logits[row, stops] = float("-inf")
            else:
                rows.append(row)
        if not rows:
            return
        # The bitmask every `TokenConstraint` fills: per row, int32 words, bit j of word i set when token
        # 32 * i + j may come next (xgrammar's layout); all bits set is "anything goes".
        vocab = logits.shape[1]
        bitmask = torch.full((len(requests), (vocab + 31) // 32), -1, dtype=torch.int32)
        for row in rows:
            requests[row].constraint.fill_bitmask(bitmask, row)  # type: ignore[union-attr]
        index = torch.tensor(rows)
        shifts = torch.arange(32, dtype=torch.int32)
        allowed = ((bitmask[index].unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab]
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))

    @staticmethod
    def _probabilities(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest set of top tokens whose mass reaches top_p (always at least one).
            drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return probs
