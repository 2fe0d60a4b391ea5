"""A model family is one object: every architecture name maps to a `ModelFamily` whose named pieces each
owning layer knows (the engine's runners, chat's templates, tool parsers, grammar formats and reasoning
specs), and its memory accounting turns the one memory setting into blocks (and, for DeepSeek-V4, the
prefix-state pool's bytes: tests/unit/test_deepseek_v4_engine.py)."""

from __future__ import annotations

import pytest
import torch

from flashserve.chat import formats
from flashserve.engine.engine import RUNNERS
from flashserve.models.deepseek_v4 import DeepseekV4ForCausalLM
from flashserve.models.llama import LlamaForCausalLM
from flashserve.models.registry import FAMILIES, MemorySetting, model_class, model_family, paged_memory
from tests.unit.fake_model import CountingModel


@pytest.mark.parametrize("architecture", sorted(FAMILIES))
def test_every_named_piece_exists_in_its_layer(architecture: str) -> None:
    family = model_family(architecture)
    assert family.runner in RUNNERS
    assert family.template in formats.TEMPLATES
    assert family.tool_format in formats.TOOL_PARSERS
    assert family.grammar_format in formats.GRAMMAR_FORMATS
    assert family.reasoning in formats.REASONING
    assert architecture in family.architectures and model_class(architecture) is family.model_class


def test_both_spellings_name_one_family() -> None:
    assert model_family("llama") is model_family("LlamaForCausalLM")
    assert model_family("deepseek_v4") is model_family("DeepseekV4ForCausalLM")
    assert model_family("llama").model_class is LlamaForCausalLM
    v4 = model_family("deepseek_v4")
    assert v4.model_class is DeepseekV4ForCausalLM and v4.runner == "sequence_state"
    assert (v4.tool_format, v4.grammar_format, v4.reasoning) == ("dsml", "dsml", "deepseek_v4")
    with pytest.raises(ValueError, match="unsupported model architecture 'qwen2'"):
        model_family("qwen2")


def test_paged_memory_spends_the_setting_on_blocks() -> None:
    model = CountingModel(num_layers=2)  # two layers of one KV head of width 1
    plan = paged_memory(model, MemorySetting(kv_cache_tokens=100, max_model_len=64, block_size=16,
                                             kv_cache_dtype=torch.bfloat16))
    assert (plan.block_size, plan.num_blocks, plan.snapshot_bytes) == (16, 7, None)
    assert plan.cache_bytes == 100 * 2 * (2 * 1 * 1 * 2)  # tokens * layers * (K and V) * bf16
    short = paged_memory(model, MemorySetting(16, 1000, 16, torch.float32))
    assert short.num_blocks == 63  # one whole context always fits
