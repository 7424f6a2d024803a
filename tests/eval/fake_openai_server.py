"""A real HTTP server on 127.0.0.1 speaking OpenAI's ``/v1/chat/completions``, for tests.

``policy(messages, request_index) -> str`` decides each reply. The server runs on a thread, on
an ephemeral port, handles a bounded number of requests, and is shut down by the context manager.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI:
    """Context manager: ``with FakeOpenAI(policy) as srv: srv.base_url, srv.requests``."""

    def __init__(self, policy: Callable[[list[dict], int], str], max_requests: int = 500):
        self.policy, self.max_requests = policy, max_requests
        self.requests: list[dict] = []
        self._lock = threading.Lock()

    def __enter__(self) -> FakeOpenAI:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    k = len(fake.requests)
                    fake.requests.append(body)
                if self.path != "/v1/chat/completions" or k >= fake.max_requests:
                    self.send_response(404 if self.path != "/v1/chat/completions" else 429)
                    self.end_headers()
                    return
                text = fake.policy(body["messages"], k)
                out = {
                    "id": f"chatcmpl-{k}",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
                data = json.dumps(out, ensure_ascii=False).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@contextlib.contextmanager
def fake_openai(policy, **kw):
    """Function form of :class:`FakeOpenAI`."""
    with FakeOpenAI(policy, **kw) as srv:
        yield srv
