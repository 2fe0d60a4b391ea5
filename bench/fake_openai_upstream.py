"""A fast fake OpenAI upstream for `bench/gateway.py`: raw asyncio, HTTP/1.1 keep-alive, no framework.

`POST .../chat/completions` answers at once: a `chat.completion` object, or (when the body asks
`"stream": true`) a 20-chunk `chat.completion.chunk` stream with a usage chunk and `[DONE]`, written in one
send. Its own cost is a few tens of microseconds a request, so what a gateway in front of it adds is the
gateway's. Any other path gets a 404.

    python bench/fake_openai_upstream.py PORT
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

CHUNKS = 20
PROMPT_TOKENS = 12


def _completion() -> bytes:
    body = {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": "fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "tok " * CHUNKS},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": CHUNKS,
                      "total_tokens": PROMPT_TOKENS + CHUNKS}}
    return json.dumps(body).encode()


def _stream() -> bytes:
    head = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()), "model": "fake"}
    events = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]}]
    events += [{**head, "choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}]}
               for _ in range(CHUNKS)]
    events.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    events.append({**head, "choices": [], "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": CHUNKS,
                                                    "total_tokens": PROMPT_TOKENS + CHUNKS}})
    payload = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    data = payload.encode()
    return f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n"


COMPLETION = _completion()
JSON_RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                 + str(len(COMPLETION)).encode() + b"\r\n\r\n" + COMPLETION)
STREAM_RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                   + _stream())
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length) if length else b""
            target = head.split(b" ", 2)[1]
            if not target.endswith(b"/chat/completions"):
                writer.write(NOT_FOUND)
            elif b'"stream":true' in body or b'"stream": true' in body:
                writer.write(STREAM_RESPONSE)
            else:
                writer.write(JSON_RESPONSE)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(_serve, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
