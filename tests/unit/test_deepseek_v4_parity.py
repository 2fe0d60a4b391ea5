"""Our DeepSeek-V4 against transformers' DeepseekV4ForCausalLM on the same random weights, float32 on CPU.

The tiny config uses every layer type (sliding, CSA with its indexer, HCA) and both routers (hash and
learned), with the parameters that transformers initialises to zero randomised so they matter. The
comparison needs the indexer's choices to be well defined: ReLU makes many scores exactly equal, so the
test checks that the k-th and (k+1)-th scores are apart before comparing.

Then self-consistency of our own model: the whole sequence in one call = in chunks of every size = one
token at a time, since a `SequenceState` carries each layer's window, compressor leftovers and entries.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from flashserve.models.deepseek_v4 import (
    CSA,
    HCA,
    SLIDING,
    DeepseekV4Config,
    DeepseekV4ForCausalLM,
)

transformers = pytest.importorskip("transformers")

SEQ = 70
TOL = 1e-4


def tiny_hf_config(**overrides: Any) -> Any:
    """The spec's tiny config: every layer type, hash + learned routing, YaRN on the compressed layers."""
    from transformers import DeepseekV4Config as HFConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=512, hidden_size=64, num_hidden_layers=4,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                     "compressed_sparse_attention"],
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, partial_rotary_factor=0.25, q_lora_rank=32,
        o_groups=2, o_lora_rank=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        moe_intermediate_size=32, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5, swiglu_limit=10.0,
        index_n_heads=8, index_head_dim=16, index_topk=4, sliding_window=8, hc_mult=4, hc_sinkhorn_iters=20,
        rope_theta=10000.0, compress_rope_theta=160000.0,
        rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 64,
                         "beta_fast": 32, "beta_slow": 1},
        max_position_embeddings=1024, initializer_range=0.1,
    )
    kwargs.update(overrides)
    return HFConfig(**kwargs)


def random_hf_model(config: Any, seed: int) -> Any:
    from transformers import DeepseekV4ForCausalLM as HFModel

    torch.manual_seed(seed)
    model = HFModel(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("sinks", "position_bias", ".base", "hc_base", "e_score_correction_bias")):
                p.copy_(torch.randn_like(p) * 0.5)
            elif name.endswith((".scale", "hc_scale")):
                p.copy_(1 + torch.randn_like(p) * 0.2)
            elif "norm" in name and p.dim() == 1:
                p.copy_(1 + torch.randn_like(p) * 0.1)
        for name, buf in model.named_buffers():
            if name.endswith("tid2eid"):
                buf.copy_(torch.stack([torch.randperm(config.n_routed_experts)[: config.num_experts_per_tok]
                                       for _ in range(config.vocab_size)]))
            elif name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.5)
    return model


def ours_from(hf_model: Any) -> DeepseekV4ForCausalLM:
    cfg = DeepseekV4Config.from_hf(hf_model.config.to_dict())
    with torch.device("meta"):  # as the server builds it: no throwaway initialisation
        model = DeepseekV4ForCausalLM(cfg)
    model.load_weights(dict(hf_model.state_dict()))  # transformers' names, mapped onto the official ones
    return model.eval()


def indexer_margins(model: DeepseekV4ForCausalLM, ids: torch.Tensor) -> float:
    """The smallest gap between the k-th and (k+1)-th indexer score over every CSA layer and query that has
    more visible entries than k (where the choice is not forced)."""
    gaps: list[float] = []

    def hook(indexer: Any, args: tuple[Any, ...], out: torch.Tensor) -> None:
        x, q_low, positions, state, rope = args
        keys = state.entries.all(indexer.dim)
        from flashserve.models.deepseek_v4 import _visible_entries, rotate

        q = rotate(indexer.wq_b(q_low).view(-1, indexer.heads, indexer.dim), *rope(positions))
        scores = torch.relu(torch.einsum("thd,nd->thn", q, keys)) * indexer.dim**-0.5
        scores = (scores * (indexer.weights_proj(x) * indexer.heads**-0.5).unsqueeze(-1)).sum(1)
        visible = _visible_entries(positions, indexer.ratio, keys.shape[0])
        for t in range(scores.shape[0]):
            row = scores[t][visible[t]].sort(descending=True).values
            if row.numel() > indexer.topk:
                gaps.append(float(row[indexer.topk - 1] - row[indexer.topk]))

    handles = [layer.attn.indexer.register_forward_hook(hook) for layer in model.layers
               if layer.attn.kind == CSA]
    model(ids)
    for h in handles:
        h.remove()
    assert gaps, "no query had a real choice: the test would prove nothing about the indexer"
    return min(gaps)


@pytest.fixture(scope="module")
def pair() -> tuple[Any, DeepseekV4ForCausalLM]:
    hf = random_hf_model(tiny_hf_config(), seed=0)
    return hf, ours_from(hf)


def test_config_reads_the_transformers_layout(pair: tuple[Any, DeepseekV4ForCausalLM]) -> None:
    cfg = pair[1].config
    assert cfg.layer_kinds == (SLIDING, CSA, HCA, CSA) and cfg.compress_ratios == (0, 4, 16, 4)
    assert cfg.hash_layers == 1 and cfg.rope_head_dim == 8 and cfg.yarn is not None and cfg.yarn.factor == 16


def test_config_reads_the_official_layout() -> None:
    official = {
        "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "head_dim": 32,
        "qk_rope_head_dim": 8, "q_lora_rank": 32, "o_groups": 2, "o_lora_rank": 16, "sliding_window": 8,
        "compress_ratios": [0, 4, 16, 4, 0], "num_hash_layers": 1, "n_routed_experts": 8, "num_experts_per_tok": 2,
        "moe_intermediate_size": 32, "rope_theta": 10000, "compress_rope_theta": 160000,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 64,
                         "beta_fast": 32, "beta_slow": 1},
        "num_nextn_predict_layers": 1,
    }
    cfg = DeepseekV4Config.from_hf(official)
    assert cfg.layer_kinds == (SLIDING, CSA, HCA, CSA) and cfg.compress_ratios == (0, 4, 16, 4)
    assert cfg.hash_layers == 1 and cfg.rope_head_dim == 8 and cfg.num_mtp_layers == 1
    assert cfg.yarn is not None and cfg.yarn.original_max_position == 64


def test_logits_match_transformers(pair: tuple[Any, DeepseekV4ForCausalLM]) -> None:
    hf, ours = pair
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (SEQ,))
    assert indexer_margins(ours, ids) > 1e-5  # far above float32 rounding of the scores (~1e-7)
    with torch.no_grad():
        expected = hf(ids.unsqueeze(0)).logits[0]
    got = ours(ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_greedy_generation_matches_transformers(pair: tuple[Any, DeepseekV4ForCausalLM]) -> None:
    """transformers re-runs the whole sequence each step (no cache); ours decodes one token at a time from
    its state: the tokens must agree."""
    hf, ours = pair
    torch.manual_seed(2)
    ids = torch.randint(0, 512, (20,))
    state = ours.new_state()
    logits = ours(ids, state)
    tokens: list[int] = []
    seq = ids
    for _ in range(30):
        nxt = int(logits[-1].argmax())
        with torch.no_grad():
            expected = int(hf(seq.unsqueeze(0)).logits[0, -1].argmax())
        assert nxt == expected, (len(tokens), nxt, expected)
        tokens.append(nxt)
        seq = torch.cat([seq, torch.tensor([nxt])])
        logits = ours(torch.tensor([nxt]), state)


@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 16, 33])
def test_chunked_prefill_equals_one_call(pair: tuple[Any, DeepseekV4ForCausalLM], chunk: int) -> None:
    ours = pair[1]
    torch.manual_seed(3)
    ids = torch.randint(0, 512, (SEQ,))
    whole = ours(ids)
    state = ours.new_state()
    parts = [ours(ids[i:i + chunk], state) for i in range(0, SEQ, chunk)]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=1e-5)
    assert state.length == SEQ


def test_routers_select_exactly(pair: tuple[Any, DeepseekV4ForCausalLM]) -> None:
    """The experts each router picks, and their weights, equal transformers' for the same inputs."""
    hf, ours = pair
    torch.manual_seed(4)
    x = torch.randn(50, 64)
    ids = torch.randint(0, 512, (50,))
    for i, layer in enumerate(ours.layers):
        gate = layer.ffn.gate
        hf_gate = hf.model.layers[i].mlp.gate
        experts, weights = gate(x, ids)
        with torch.no_grad():
            _, hf_weights, hf_experts = hf_gate(x, ids) if gate.hashed else hf_gate(x)
        order, hf_order = experts.sort(dim=-1), hf_experts.sort(dim=-1)
        assert torch.equal(order.values, hf_order.values), i
        torch.testing.assert_close(weights.gather(1, order.indices), hf_weights.gather(1, hf_order.indices))


def test_resuming_from_a_copy_at_a_unit_boundary_equals_one_call(pair: tuple[Any, DeepseekV4ForCausalLM]) -> None:
    """What a prefix-cache hit does: copy the state at a 128-token boundary, then run the rest from the copy
    (twice, to show the copy is untouched by the first continuation)."""
    ours = pair[1]
    torch.manual_seed(5)
    ids = torch.randint(0, 512, (300,))
    whole = ours(ids)
    state = ours.new_state()
    head = ours(ids[:256], state)
    snapshot = state.copy()
    ours(torch.randint(0, 512, (20,)), state)  # another continuation moves the original on
    for _ in range(2):
        resumed = snapshot.copy()
        tail = ours(ids[256:], resumed)
        torch.testing.assert_close(torch.cat([head, tail]), whole, rtol=0, atol=1e-5)
    # The copy shares the full pages of compressed entries with the state it was taken from, even after
    # that state went on: 256 tokens made 64 CSA entries, one full page, which no append writes again.
    csa, moved_on = snapshot.layers[1].compressor.entries, state.layers[1].compressor.entries
    assert csa.count == 256 // 4 and moved_on.count == 276 // 4 and csa.pages[0] is moved_on.pages[0]


def test_entry_pages_append_across_page_edges() -> None:
    from flashserve.models.deepseek_v4 import PAGE_ENTRIES, EntryPages

    pages = EntryPages()
    rows = torch.arange(3 * PAGE_ENTRIES + 5, dtype=torch.float32).unsqueeze(1)
    for piece in rows.split([1, PAGE_ENTRIES - 2, 3, 2 * PAGE_ENTRIES + 3]):
        before = pages.copy()
        pages.append(piece)
        assert torch.equal(before.all(1), rows[: before.count])  # a copy never sees later appends
    assert torch.equal(pages.all(1), rows) and all(p.shape[0] == PAGE_ENTRIES for p in pages.pages[:-1])
