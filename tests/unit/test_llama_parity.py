"""Our LlamaForCausalLM (paged attention) against transformers' LlamaForCausalLM (eager attention) on the
same weights, in float32 on CPU: prefill logits, one-token-at-a-time greedy decoding through the paged cache,
two requests batched in one forward, and tiny random configs (rope scaling, biases, tying)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from flashserve.models.layers import AttentionMetadata, LayerKVCache
from flashserve.models.llama import LlamaConfig, LlamaForCausalLM
from flashserve.models.loading import Checkpoint
from flashserve.models.registry import build_model, model_class
from flashserve.models.tokenizer import encode

transformers = pytest.importorskip("transformers")

PREFILL_TOL = 1e-3
DECODE_STEPS = 16

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWrite a Python function that returns the n-th Fibonacci number.<|im_end|>\n"
    "<|im_start|>assistant\n",
    "The quick brown fox",
]


def hf_config(config: dict[str, Any]) -> Any:
    """A transformers LlamaConfig from our HF-style config dict."""
    rope = {"rope_type": "default", "rope_theta": config["rope_theta"]}
    if config.get("rope_scaling"):
        rope = {**config["rope_scaling"], "rope_theta": config["rope_theta"]}
    return transformers.LlamaConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        head_dim=config["head_dim"],
        rms_norm_eps=config["rms_norm_eps"],
        max_position_embeddings=config["max_position_embeddings"],
        tie_word_embeddings=config["tie_word_embeddings"],
        attention_bias=config.get("attention_bias", False),
        mlp_bias=config.get("mlp_bias", False),
        rope_parameters=rope,
        attn_implementation="eager",
    )


def hf_model(config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> Any:
    from transformers.initialization import no_init_weights

    with no_init_weights():  # skip random init of 135M parameters that are overwritten right away
        model = transformers.LlamaForCausalLM(hf_config(config))
    if config["tie_word_embeddings"]:
        model.tie_weights()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if config["tie_word_embeddings"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


class PagedRunner:
    """Drives our model the way the engine does: flat batches, slot-addressed KV cache per layer."""

    def __init__(self, model: LlamaForCausalLM, num_slots: int = 256) -> None:
        self.model = model
        self.caches = [
            LayerKVCache(
                torch.zeros(num_slots, s.num_kv_heads, s.head_dim),
                torch.zeros(num_slots, s.num_kv_heads, s.head_dim),
            )
            for s in model.cache_specs()
        ]

    @torch.no_grad()
    def step(self, chunks: list[tuple[list[int], int, int]]) -> list[torch.Tensor]:
        """chunks: (new token ids, tokens already cached, the request's first slot) -> logits per chunk."""
        ids, positions, tables, q_lens, ctx_lens = [], [], [], [], []
        for tokens, cached, base in chunks:
            ids += tokens
            positions += range(cached, cached + len(tokens))
            ctx = cached + len(tokens)
            tables.append(list(range(base, base + ctx)))  # one-slot blocks: each request's slots are contiguous
            q_lens.append(len(tokens))
            ctx_lens.append(ctx)
        meta = AttentionMetadata.build(tables, q_lens, ctx_lens, block_size=1)
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), meta, self.caches)
        logits = self.model.compute_logits(hidden)
        return [logits[s.q_start : s.q_start + s.q_len] for s in meta.seqs]


@pytest.fixture(scope="module")
def models(smollm: Checkpoint) -> tuple[LlamaForCausalLM, Any]:
    torch.manual_seed(0)
    ours = build_model(smollm, torch.float32)
    assert isinstance(ours, LlamaForCausalLM)
    return ours, hf_model(smollm.config, smollm.state_dict)


@pytest.fixture(scope="module")
def prompt_ids(smollm: Checkpoint) -> list[list[int]]:
    return [encode(smollm.tokenizer, p) for p in PROMPTS]


def test_build_model(models: tuple[LlamaForCausalLM, Any], smollm: Checkpoint) -> None:
    ours, _ = models
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    assert all(not t.is_meta for t in [*ours.parameters(), *ours.buffers()])
    assert len(ours.cache_specs()) == 30 and ours.cache_specs()[0].num_kv_heads == 3
    assert model_class("LlamaForCausalLM") is model_class("llama") is LlamaForCausalLM
    with pytest.raises(ValueError, match="unsupported model architecture"):
        model_class("mamba")


@torch.no_grad()
def test_prefill_logits_match(models: tuple[LlamaForCausalLM, Any], prompt_ids: list[list[int]]) -> None:
    ours, ref = models
    for ids in prompt_ids:
        expected = ref(torch.tensor([ids])).logits[0]
        got = PagedRunner(ours).step([(ids, 0, 0)])[0]
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert (got - expected).abs().max().item() <= PREFILL_TOL


@pytest.fixture(scope="module")
@torch.no_grad()
def our_greedy(models: tuple[LlamaForCausalLM, Any], prompt_ids: list[list[int]]) -> list[list[torch.Tensor]]:
    """Our side, per prompt: the logits of DECODE_STEPS greedy steps, decoding one token per forward."""
    ours, _ = models
    result = []
    for ids in prompt_ids:
        runner = PagedRunner(ours)
        steps = [runner.step([(ids, 0, 0)])[0][-1]]
        for i in range(DECODE_STEPS - 1):
            steps.append(runner.step([([int(steps[-1].argmax())], len(ids) + i, 0)])[0][-1])
        result.append(steps)
    return result


@torch.no_grad()
def test_greedy_decode_one_token_at_a_time(
    models: tuple[LlamaForCausalLM, Any], prompt_ids: list[list[int]], our_greedy: list[list[torch.Tensor]]
) -> None:
    _, ref = models
    for ids, ours in zip(prompt_ids, our_greedy, strict=True):
        # reference: transformers' own incremental decoding (its DynamicCache, eager attention)
        out = ref(torch.tensor([ids]), use_cache=True)
        ref_steps = [out.logits[0, -1]]
        for _ in range(DECODE_STEPS - 1):
            nxt = torch.tensor([[int(ref_steps[-1].argmax())]])
            out = ref(nxt, cache=out.past_key_values, use_cache=True)
            ref_steps.append(out.logits[0, -1])
        assert [int(x.argmax()) for x in ours] == [int(x.argmax()) for x in ref_steps]
        assert max((a - b).abs().max().item() for a, b in zip(ours, ref_steps, strict=True)) <= PREFILL_TOL


def test_greedy_answer_is_sensible(our_greedy: list[list[torch.Tensor]], smollm: Checkpoint) -> None:
    """Parity cannot catch a wrong Q/K un-permutation (both sides share the weights); an answer can."""
    answer = smollm.tokenizer.decode([int(x.argmax()) for x in our_greedy[0]])
    assert "Paris" in answer, answer


@torch.no_grad()
def test_two_sequences_batched_match_solo(
    models: tuple[LlamaForCausalLM, Any], prompt_ids: list[list[int]]
) -> None:
    ours, _ = models
    a, b = prompt_ids[0], prompt_ids[1]
    assert len(a) != len(b)
    solo_a = PagedRunner(ours).step([(a, 0, 0)])[0]
    solo_b = PagedRunner(ours).step([(b, 0, 0)])[0]

    runner = PagedRunner(ours)
    base_a, base_b = 0, 128
    got_a, got_b = runner.step([(a, 0, base_a), (b, 0, base_b)])
    # Logits reach ~30: 2e-4 is float32 rounding of differently shaped prefill matmuls (see below).
    assert (got_a - solo_a).abs().max().item() <= 2e-4
    assert (got_b - solo_b).abs().max().item() <= 2e-4

    # Then a mixed step: a decode for A and a decode for B in one batch, against each solo continuation.
    next_a, next_b = int(got_a[-1].argmax()), int(got_b[-1].argmax())
    mixed_a, mixed_b = runner.step([([next_a], len(a), base_a), ([next_b], len(b), base_b)])
    solo_runner = PagedRunner(ours)
    solo_runner.step([(a, 0, 0)])
    (solo_next_a,) = solo_runner.step([([next_a], len(a), 0)])
    assert (mixed_a - solo_next_a).abs().max().item() <= 1e-4
    solo_runner = PagedRunner(ours)
    solo_runner.step([(b, 0, 0)])
    (solo_next_b,) = solo_runner.step([([next_b], len(b), 0)])
    assert (mixed_b - solo_next_b).abs().max().item() <= 1e-4


@torch.no_grad()
def test_chunked_prefill_matches_full(
    models: tuple[LlamaForCausalLM, Any], prompt_ids: list[list[int]]
) -> None:
    """A prompt prefilled in two chunks (the second attending to cached context) equals one full prefill."""
    ours, _ = models
    ids = prompt_ids[1]
    full = PagedRunner(ours).step([(ids, 0, 0)])[0]
    runner = PagedRunner(ours)
    cut = len(ids) // 3
    first = runner.step([(ids[:cut], 0, 100)])[0]
    second = runner.step([(ids[cut:], cut, 100)])[0]
    # Logits reach ~30: 2e-4 is float32 rounding of differently shaped matmuls, not a wrong context.
    assert (torch.cat([first, second]) - full).abs().max().item() <= 2e-4


# --------------------------------------------------------------------------------------------------
# Tiny random configs: parity independent of the real weights

TINY_CONFIGS = {
    "gqa-untied": {},
    "mha-tied-bias-linear-rope": {
        "num_key_value_heads": 4,
        "tie_word_embeddings": True,
        "attention_bias": True,
        "mlp_bias": True,
        "rope_scaling": {"rope_type": "linear", "factor": 4.0},
    },
    "llama3-rope": {
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    },
}


@pytest.mark.parametrize("variant", list(TINY_CONFIGS))
@torch.no_grad()
def test_tiny_random_llama_parity(variant: str) -> None:
    config: dict[str, Any] = {
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "rope_scaling": None,
        **TINY_CONFIGS[variant],
    }
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(hf_config(config)).eval()
    for p in ref.parameters():  # HF initialises norms to 1 and biases to 0: randomise so they matter
        p.add_(torch.randn_like(p) * 0.05)
    state_dict = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    if config["tie_word_embeddings"]:
        state_dict.pop("lm_head.weight")

    ours = LlamaForCausalLM(LlamaConfig.from_hf(config))
    ours.load_weights(state_dict)
    ours.eval()

    ids = torch.randint(0, config["vocab_size"], (90,)).tolist()
    expected = ref(torch.tensor([ids])).logits[0]
    got = PagedRunner(ours, num_slots=256).step([(ids, 0, 0)])[0]
    assert (got - expected).abs().max().item() <= 1e-4

    # decode 8 tokens one at a time; compare every step's logits with a full recompute
    runner = PagedRunner(ours, num_slots=256)
    runner.step([(ids[:-1], 0, 0)])
    seq = list(ids)
    for i in range(8):
        step_logits = runner.step([([seq[-1]], len(seq) - 1, 0)])[0][-1]
        ref_logits = ref(torch.tensor([seq]), use_cache=False).logits[0, -1]
        assert (step_logits - ref_logits).abs().max().item() <= 1e-4, i
        seq.append(int(ref_logits.argmax()))


def test_config_validation() -> None:
    base: dict[str, Any] = {
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    cfg = LlamaConfig.from_hf(base)
    assert cfg.head_dim == 4 and cfg.rope_scaling is None
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        LlamaConfig.from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(AssertionError):
        LlamaConfig.from_hf({**base, "num_key_value_heads": 3})
    # transformers 5 style: rope_parameters instead of rope_theta / rope_scaling
    cfg = LlamaConfig.from_hf(
        {**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}}
    )
    assert cfg.rope_theta == 500.0 and cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
