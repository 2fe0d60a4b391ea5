"""The head's top candidates are rescored in float32 when it runs in low precision (llama.compute_logits).

bf16 logits step by 0.125 near 25, enough to tie or swap SmolLM2's top tokens; these tests check that the
top candidates carry exact float32 logits, that greedy picks the float32 argmax on a near-tie the bf16
head gets wrong, and that an exact head is left alone.
"""

from __future__ import annotations

import pytest
import torch

from flashserve.kernels import cpu_ops
from flashserve.models.llama import REFINE_TOP_K, LlamaConfig, LlamaForCausalLM

CONFIG = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                     tie_word_embeddings=True)


def packed(weight_quant: str, dense_dtype: torch.dtype | None) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(0.5)
    model.pack(weight_quant, dense_dtype)
    return model.eval()


def test_top_candidates_carry_exact_float32_logits() -> None:
    model = packed("int8", torch.bfloat16)
    assert model.exact_head is not None and model.exact_head.dtype == torch.float32
    hidden = torch.randn(5, CONFIG.hidden_size) * 4
    exact = hidden @ model.model.embed_tokens.weight.T
    with torch.no_grad():
        for decode_rows in (0, 3, 5):
            logits = model.compute_logits(hidden, decode_rows)
            top = logits.topk(REFINE_TOP_K, dim=-1).indices
            torch.testing.assert_close(logits.gather(1, top), exact.gather(1, top), rtol=1e-5, atol=1e-5)
            assert torch.equal(logits.argmax(-1), exact.argmax(-1))


def test_greedy_follows_float32_on_a_near_tie() -> None:
    """Two tokens 0.05 apart near 25: bf16 rounds them to the same or swapped values, float32 does not."""
    model = packed("none", torch.bfloat16)
    weight = model.model.embed_tokens.weight
    hidden = torch.zeros(1, CONFIG.hidden_size)
    hidden[0, 0] = 1.0
    with torch.no_grad():
        weight[:, 0] = 0.0
        weight[7, 0], weight[3, 0] = 25.31, 25.26  # token 7 wins in float32; both round to 25.25 in bf16
    # The packed head copied the table: rebuild it from the edited one.
    model.lm_head = type(model.lm_head)([_linear(weight)], "none", torch.bfloat16)
    with torch.no_grad():
        coarse = model.lm_head(hidden).float()
        assert coarse[0, 7] <= coarse[0, 3]  # the bf16 head alone cannot tell them apart
        assert int(model.compute_logits(hidden).argmax()) == 7


def test_exact_head_is_not_rescored() -> None:
    model = packed("none", None)
    assert model.exact_head is None
    hidden = torch.randn(3, CONFIG.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(model.compute_logits(hidden), hidden @ model.model.embed_tokens.weight.T)


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
    return lin


def test_int4_head_only_with_a_float32_head_to_rescore_from() -> None:
    model = packed("int4", torch.bfloat16)
    assert model.lm_head.quant is not None and model.lm_head.quant.bits == 4 and model.exact_head is not None
    torch.manual_seed(1)
    bf16_model = LlamaForCausalLM(CONFIG).to(torch.bfloat16)
    bf16_model.pack("int4", torch.bfloat16)
    assert bf16_model.exact_head is None
    assert bf16_model.lm_head.quant is not None and bf16_model.lm_head.quant.bits == 8


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("weight_quant", ["none", "int8", "int4"])
def test_rescored_logits_do_not_depend_on_batch(weight_quant: str, native: bool,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row's logits (the head, then its rescored candidates) are the row's logits alone, for decode and
    prompt rows, with the native rescoring kernel and with torch's."""
    if not native:
        monkeypatch.setattr("flashserve.models.llama.cpu_ops", lambda: None)
    model = packed(weight_quant, torch.bfloat16)
    assert model.exact_head is not None
    torch.manual_seed(2)
    hidden = torch.randn(19, CONFIG.hidden_size) * 4
    with torch.no_grad():
        for decode_rows in (0, 1, 7, 19):
            alone = torch.cat([model.compute_logits(hidden[r : r + 1], int(r < decode_rows)) for r in range(19)])
            assert torch.equal(model.compute_logits(hidden, decode_rows), alone), decode_rows


def q8_grid(weight: torch.Tensor) -> None:
    """Put `weight` (float32, in place) on GGUF Q8_0's grid: an fp16 scale per 32 inputs times an int8 code."""
    groups = weight.view(weight.shape[0], -1, 32)
    scale = _q8_scales(weight).unsqueeze(2)
    groups.copy_(torch.round(groups / scale) * scale)


def _q8_scales(table: torch.Tensor) -> torch.Tensor:
    """The float32 scale per 32 entries of a table `q8_grid` made."""
    return (table.view(table.shape[0], -1, 32).abs().amax(dim=2) / 127).to(torch.float16).float()


def test_logprobs_head_read_from_q8_codes_gives_the_float32_bits() -> None:
    """A float32 head that is a Q8_0 table (the embedded GGUF's) is read for logprobs from its int8 codes, a
    quarter of the bytes, and gives the very bits of the float32 table: the rescored candidates (float32
    table) and the full head (int8 codes) agree, so greedy's token is the logprobs' top token."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG)
    with torch.no_grad():
        q8_grid(model.model.embed_tokens.weight)
    model.pack("int4", torch.bfloat16)
    ops = cpu_ops()
    if ops is None:
        assert model.exact_head_q8 is None
        pytest.skip("native kernels off (FLASHSERVE_NATIVE_KERNELS=0): no q8 read to check")
    # Read from the codes where the level widens int8 fast; below AVX2 on x86 from the float32 table.
    assert (model.exact_head_q8 is not None) == ops.gather_dot_q8_pays
    torch.manual_seed(3)
    hidden = torch.randn(6, CONFIG.hidden_size) * 4
    exact = model.exact_head
    every = torch.arange(exact.shape[0]).expand(6, -1).contiguous()
    with torch.no_grad():
        full = model.exact_logits(hidden)
        assert torch.equal(full, ops.gather_dot(exact, hidden, every))
        # the q8 kernel gives the float32 bits at every level, used or not
        codes = torch.round(exact.view(exact.shape[0], -1, 32) / _q8_scales(exact).unsqueeze(2))
        assert torch.equal(ops.gather_dot_q8(codes.to(torch.int8).view_as(exact), _q8_scales(exact), hidden,
                                             every), full)
        rescored = model.lm_head.forward(hidden, 6).float().topk(REFINE_TOP_K, dim=-1).indices
        logits = model.compute_logits(hidden, 6)
        assert torch.equal(logits.gather(1, rescored), full.gather(1, rescored))
        assert torch.equal(logits.argmax(-1), full.argmax(-1))
        assert torch.equal(torch.cat([model.exact_logits(hidden[r : r + 1]) for r in range(6)]), full)


def test_a_head_off_the_q8_grid_keeps_its_float32_table() -> None:
    model = packed("int4", torch.bfloat16)
    assert model.exact_head is not None and model.exact_head_q8 is None
