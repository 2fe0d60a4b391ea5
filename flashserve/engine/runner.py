"""Runs the model on one scheduled batch and returns the logits to sample from.

The runner is the only engine part that knows tensors: it flattens the
scheduled chunks into one token batch, turns block tables into cache slot
indices, calls the model, and computes logits only for the rows that sample
(the last token of each request whose known tokens are now all computed).
"""

from __future__ import annotations

import torch
from torch import nn

from flashserve.engine.kv_cache import KVCacheStorage
from flashserve.engine.scheduler import SchedulerOutput
from flashserve.models.layers import AttentionMetadata, SeqAttention


class ModelRunner:
    def __init__(self, model: nn.Module, storage: KVCacheStorage, block_size: int,
                 device: torch.device | str = "cpu") -> None:
        self.model = model
        self.storage = storage
        self.block_size = block_size
        self.device = torch.device(device)
        self._block_offsets = torch.arange(block_size)

    def _slots(self, block_ids: list[int], num_tokens: int) -> torch.Tensor:
        blocks = torch.tensor(block_ids, dtype=torch.int64)
        slots = (blocks.unsqueeze(1) * self.block_size + self._block_offsets).flatten()
        return slots[:num_tokens]

    @torch.inference_mode()
    def run(self, batch: SchedulerOutput) -> torch.Tensor:
        """Logits [num_sampling_requests, vocab], in `batch.sampling_requests` order."""
        token_ids: list[int] = []
        positions: list[torch.Tensor] = []
        new_slots: list[torch.Tensor] = []
        seqs: list[SeqAttention] = []
        logit_rows: list[int] = []
        for chunk in batch.chunks:
            request = chunk.request
            start = request.num_computed_tokens
            end = start + chunk.num_new_tokens
            token_ids.extend(request.all_token_ids[start:end])
            positions.append(torch.arange(start, end))
            ctx_slots = self._slots(request.block_ids, end)
            new_slots.append(ctx_slots[start:end])
            seqs.append(SeqAttention(q_start=len(token_ids) - chunk.num_new_tokens, q_len=chunk.num_new_tokens,
                                     ctx_len=end, ctx_slots=ctx_slots.to(self.device)))
            if chunk.samples:
                logit_rows.append(len(token_ids) - 1)
        meta = AttentionMetadata(slot_mapping=torch.cat(new_slots).to(self.device), seqs=seqs)
        input_ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
        hidden = self.model(input_ids, torch.cat(positions).to(self.device), meta, self.storage.layers)
        rows = torch.tensor(logit_rows, dtype=torch.int64, device=self.device)
        return self.model.compute_logits(hidden[rows]).float().cpu()
