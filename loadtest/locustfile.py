"""Interactive load test with Locust (``pip install locust``; not needed by ``python -m loadtest``).

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000
    # then open http://127.0.0.1:8089, or headless:
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 32 -r 8 -t 2m

Environment: UFB_LOADTEST_ROUTE (/v1/embeddings, default, or /embed), UFB_LOADTEST_INPUTS (texts per request,
default 1), UFB_LOADTEST_API_KEY (Bearer key, if the server requires one). Texts come from the same realistic
English mix as ``python -m loadtest``.
"""

from __future__ import annotations

import os

try:
    from locust import FastHttpUser, between, task
except ImportError:
    raise SystemExit(
        "loadtest/locustfile.py runs under Locust, which is not installed: pip install locust, then "
        "locust -f loadtest/locustfile.py --host URL (python -m loadtest needs no Locust)"
    ) from None

from loadtest.corpus import TextMix

ROUTE = os.environ.get("UFB_LOADTEST_ROUTE", "/v1/embeddings")
INPUTS = int(os.environ.get("UFB_LOADTEST_INPUTS", "1"))
API_KEY = os.environ.get("UFB_LOADTEST_API_KEY")


class EmbeddingUser(FastHttpUser):
    wait_time = between(0.0, 0.1)

    def on_start(self) -> None:
        self.mix = TextMix(seed=hash(id(self)) & 0xFFFF)
        self.headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}

    @task
    def embed(self) -> None:
        texts = self.mix.texts(INPUTS)
        one = texts[0] if INPUTS == 1 else texts
        if ROUTE == "/v1/embeddings":
            body = {"input": one, "model": "ufb", "encoding_format": "base64"}
        else:
            body = {"inputs": one}
        with self.client.post(ROUTE, json=body, headers=self.headers, name=ROUTE, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}")
