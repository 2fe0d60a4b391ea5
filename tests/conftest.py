"""Shared test fixtures: the embedded SmolLM2 checkpoint, loaded once per test session.

Tests never touch the network: transformers and huggingface_hub are told to stay offline before
anything imports them, so a reference tokenizer or model can only come from local files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from flashserve.models.loading import Checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    from flashserve.models.loading import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def smollm(smollm_path: Path) -> Checkpoint:
    """The embedded SmolLM2-135M-Instruct, dequantized to float32 (shared: treat as read-only)."""
    import torch

    from flashserve.models.loading import load_checkpoint

    return load_checkpoint(smollm_path, dtype=torch.float32)
