"""What a model page shows besides the card: a worked cost example, the request/response schema, and
copy-ready client examples filled in with this server's base URL. Everything comes from the same
`ModelCard.to_openai()` that `GET /v1/models/{id}` returns, so the page and the API cannot disagree."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from flashserve.accounts.pricing import format_usd
from flashserve.catalog import ModelCard

KEY_PLACEHOLDER = "$FLASHSERVE_API_KEY"


@dataclass(frozen=True, slots=True)
class CostExample:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    hit_usd: str
    miss_usd: str
    output_usd: str
    total_usd: str


def cost_example(card: ModelCard, prompt: int = 10_000, cached: int = 8_000, completion: int = 1_000) -> CostExample:
    """A cached request's exact cost, term by term, with the card's prices (the ledger's own arithmetic)."""
    p = card.token_prices
    return CostExample(prompt, cached, completion, format_usd(cached * p.input_cache_hit),
                       format_usd((prompt - cached) * p.input_cache_miss), format_usd(completion * p.output),
                       format_usd(p.cost(prompt, cached, completion)))


# The request fields the page documents: (name, type, what it does).
REQUEST_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("model", "string, required", "The model id."),
    ("messages", "array, required", "system / user / assistant / tool messages; content is text."),
    ("stream", "boolean", "Server-sent events of chat.completion.chunk; stream_options.include_usage adds a "
                          "final usage chunk."),
    ("max_tokens", "integer", "Most tokens to generate (clamped to the model's output cap)."),
    ("temperature", "number 0-2", "Sampling temperature; 0 is greedy."),
    ("top_p", "number 0-1", "Nucleus sampling."),
    ("stop", "string or array", "Up to 16 stop sequences."),
    ("reasoning_effort", "string", "low / medium / high / max (thinking models)."),
    ("response_format", "object", "{\"type\": \"json_object\"} or {\"type\": \"json_schema\", ...}."),
    ("tools", "array", "Function tools (JSON schema parameters); tool_choice picks none / auto / required / one."),
    ("seed", "integer", "Repeatable sampling."),
    ("logprobs / top_logprobs", "boolean / integer", "Token log probabilities."),
)


def response_example(card: ModelCard) -> str:
    body: dict[str, Any] = {
        "id": "chatcmpl-…", "object": "chat.completion", "created": 1764720000, "model": card.id,
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": "Paris.", "reasoning_content": "…"}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15,
                  "prompt_tokens_details": {"cached_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0}, "cost": 0.00000252},
    }
    return json.dumps(body, indent=2, ensure_ascii=False)


def examples(card: ModelCard, base_url: str, key: str = KEY_PLACEHOLDER) -> dict[str, str]:
    """Copy-ready requests to this server for `card`, by client."""
    model = json.dumps(card.id)
    v1 = f"{base_url}/v1"
    key_js = "process.env.FLASHSERVE_API_KEY"
    return {
        "curl": (f"curl {v1}/chat/completions \\\n"
                 f"  -H \"Authorization: Bearer {key}\" \\\n"
                 "  -H \"Content-Type: application/json\" \\\n"
                 f"  -d '{{\"model\": {model}, \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'"),
        "python": ("import os\nfrom openai import OpenAI\n\n"
                   f"client = OpenAI(base_url=\"{v1}\", api_key=os.environ[\"FLASHSERVE_API_KEY\"])\n"
                   f"reply = client.chat.completions.create(\n    model={model},\n"
                   "    messages=[{\"role\": \"user\", \"content\": \"Hello!\"}],\n)\n"
                   "print(reply.choices[0].message.content)"),
        "fetch": (f"const r = await fetch(\"{v1}/chat/completions\", {{\n  method: \"POST\",\n"
                  f"  headers: {{\"Authorization\": `Bearer ${{{key_js}}}`, \"Content-Type\": \"application/json\"}},\n"
                  f"  body: JSON.stringify({{model: {model}, messages: [{{role: \"user\", content: \"Hello!\"}}]}}),\n"
                  "});\nconsole.log((await r.json()).choices[0].message.content);"),
        "openai-js": ("import OpenAI from \"openai\";\n\n"
                      f"const client = new OpenAI({{baseURL: \"{v1}\", apiKey: {key_js}}});\n"
                      f"const reply = await client.chat.completions.create({{\n  model: {model},\n"
                      "  messages: [{role: \"user\", content: \"Hello!\"}],\n});\n"
                      "console.log(reply.choices[0].message.content);"),
        "anthropic": ("import os\nimport anthropic\n\n"
                      f"client = anthropic.Anthropic(base_url=\"{base_url}\", "
                      "api_key=os.environ[\"FLASHSERVE_API_KEY\"])\n"
                      f"message = client.messages.create(\n    model={model},\n    max_tokens=1024,\n"
                      "    messages=[{\"role\": \"user\", \"content\": \"Hello!\"}],\n)\n"
                      "print(message.content[-1].text)"),
    }


EXAMPLE_LABELS = {"curl": "curl", "python": "Python (openai)", "fetch": "JavaScript (fetch)",
                  "openai-js": "JavaScript (openai)", "anthropic": "Python (anthropic)"}
