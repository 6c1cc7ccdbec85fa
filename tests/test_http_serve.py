"""`kvstore serve --http-port` serves the OpenAI-compatible API beside gRPC, in its process,
with the API keys it was given, and stops cleanly on SIGINT."""
from __future__ import annotations

import signal

import openai
import pytest
from serveprocess import start_serve, stop_serve


def test_serve_starts_the_http_api(tmp_path):
    served = start_serve(tmp_path, "--http-port", "0", api_keys="sk-test=tenant-a")
    try:
        url = served.banner.split("OpenAI-compatible API on ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        with openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0) as client:
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
            assert r.usage.completion_tokens >= 1
        with openai.OpenAI(base_url=url, api_key="sk-wrong", max_retries=0) as client, \
                pytest.raises(openai.AuthenticationError):
            client.models.list()
    finally:
        output = stop_serve(served, signal.SIGINT)
    assert "shutting down" in output
