"""Sampler: greedy, logit_bias, penalties, top_p, and per-request seeds."""

from __future__ import annotations

import torch

from flashserve.engine.request import Request, SamplingParams
from flashserve.engine.sampler import Sampler

V = 50


def req(rid: str = "r", outputs: list[int] | None = None, **params: object) -> Request:
    r = Request(rid, [1], SamplingParams(**params), max_output_tokens=100)  # type: ignore[arg-type]
    r.output_token_ids = list(outputs or [])
    return r


def flat_logits(rows: int = 1) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(rows, V) * 0.1


def test_temperature_zero_is_argmax() -> None:
    logits = flat_logits(3)
    requests = [req(str(i), temperature=0.0) for i in range(3)]
    assert Sampler(V)(logits.clone(), requests) == logits.argmax(-1).tolist()


def test_logit_bias_forces_and_bans_tokens() -> None:
    logits = flat_logits()
    assert Sampler(V)(logits.clone(), [req(temperature=0.0, logit_bias={17: 100.0})]) == [17]
    best = int(logits.argmax())
    assert Sampler(V)(logits.clone(), [req(temperature=0.0, logit_bias={best: -100.0})]) != [best]
    # Banned at temperature 1 too: never drawn in many samples.
    r = req(temperature=1.0, seed=3, logit_bias={best: -100.0})
    assert all(Sampler(V)(logits.clone(), [r]) != [best] for _ in range(200))


def test_penalties_follow_openai_definition() -> None:
    logits = torch.zeros(1, V)
    logits[0, 5] = 1.0
    logits[0, 6] = 0.9
    # Token 5 was generated twice: frequency 0.1*2 plus presence 0.0 drops it below token 6.
    assert Sampler(V)(logits.clone(), [req(outputs=[5, 5], temperature=0.0, frequency_penalty=0.1)]) == [6]
    assert Sampler(V)(logits.clone(), [req(outputs=[5], temperature=0.0, presence_penalty=0.2)]) == [6]
    # Negative penalties encourage repetition.
    assert Sampler(V)(logits.clone(), [req(outputs=[7], temperature=0.0, presence_penalty=-2.0)]) == [7]


def test_penalties_work_on_logits_made_in_inference_mode() -> None:
    # The runner produces inference tensors; in-place edits of them outside inference mode raise.
    with torch.inference_mode():
        logits = torch.zeros(2, V)
        logits[:, 5] = 1.0
    requests = [req("a", outputs=[5], temperature=0.0, presence_penalty=2.0), req("b", outputs=[5], temperature=0.0)]
    assert Sampler(V)(logits, requests) == [0, 5]
    assert logits[0, 5] == 1.0, "the caller's logits are left untouched"


def test_top_p_restricts_to_the_nucleus() -> None:
    logits = torch.full((1, V), -5.0)
    logits[0, :3] = torch.tensor([3.0, 2.5, 2.0])
    r = req(temperature=1.0, top_p=0.6, seed=1)  # p = [0.50, 0.30, 0.18, ...]
    drawn = {Sampler(V)(logits.clone(), [r])[0] for _ in range(300)}
    assert drawn <= {0, 1} and drawn == {0, 1}
    r = req(temperature=1.0, top_p=1.0, seed=1)
    assert len({Sampler(V)(logits.clone(), [r])[0] for _ in range(300)}) > 3


def draw(seed: int, neighbours: int, steps: int = 20) -> list[int]:
    """Draws for one seeded request sharing its batch with `neighbours` unseeded ones."""
    torch.manual_seed(7)
    target_row = torch.randn(V) * 2
    target = req("target", temperature=1.0, seed=seed)
    others = [req(f"o{i}", temperature=1.0) for i in range(neighbours)]
    at = neighbours // 2
    sampler = Sampler(V)
    out = []
    for _ in range(steps):
        logits = torch.randn(1 + neighbours, V) * 2
        logits[at] = target_row
        out.append(sampler(logits, [*others[:at], target, *others[at:]])[at])
    return out


def test_seed_gives_the_same_tokens_whatever_else_is_in_the_batch() -> None:
    alone = draw(seed=1234, neighbours=0)
    assert draw(seed=1234, neighbours=5) == alone
    assert draw(seed=1234, neighbours=2) == alone
    assert draw(seed=99, neighbours=0) != alone


class MaskAll:
    """A grammar that allows only token 3 and counts how often it was asked."""

    def __init__(self) -> None:
        self.asked = 0

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.asked += 1
        bitmask[row] = 0
        bitmask[row, 0] = 1 << 3

    def accept(self, token_id: int) -> bool:
        return token_id == 3

    @property
    def is_terminated(self) -> bool:
        return False


def test_a_thinking_request_gets_its_grammar_only_after_the_end_marker() -> None:
    from flashserve.engine.request import ThinkingControl

    logits = torch.zeros(1, V)
    logits[0, 0] = 5.0  # the stop token is the model's favourite
    logits[0, 9] = 1.0
    r = req(temperature=0.0, stop_token_ids=(0,))
    r.constraint, r.thinking = MaskAll(), ThinkingControl((7,))
    # Thinking: no grammar mask, but the turn cannot end before the constrained answer.
    assert Sampler(V)(logits.clone(), [r]) == [9] and r.constraint.asked == 0
    r.thinking_done = True
    assert Sampler(V)(logits.clone(), [r]) == [3] and r.constraint.asked == 1
