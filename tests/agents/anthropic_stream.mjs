// One streaming Messages call with the pinned @anthropic-ai/sdk against a flashserve server, for
// tests/e2e/test_anthropic_clients.py. Reads FLASHSERVE_BASE_URL and FLASHSERVE_API_KEY; prints one JSON
// line: the event types seen, the streamed text and the final message.
import Anthropic from "@anthropic-ai/sdk";

const client = new Anthropic({ baseURL: process.env.FLASHSERVE_BASE_URL, apiKey: process.env.FLASHSERVE_API_KEY,
                               maxRetries: 0 });
const stream = client.messages.stream({
  model: "claude-sonnet-5",
  max_tokens: 256,
  thinking: { type: "adaptive" },
  messages: [{ role: "user", content: "say hello" }],
});
const events = [];
let text = "";
stream.on("streamEvent", (event) => events.push(event.type));
stream.on("text", (delta) => { text += delta; });
const message = await stream.finalMessage();
console.log(JSON.stringify({ events, text, message }));
