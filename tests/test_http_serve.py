"""`kvstore serve --http-port` serves the OpenAI-compatible API beside gRPC, in its process,
with the API keys it was given, and stops cleanly on SIGINT."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import openai
import pytest


def test_serve_starts_the_http_api(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", "serve", "--port", "0", "--http-port", "0",
                             "--model", "tiny", "--workers", "1", "--data-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "KVSTORE_SERVE_API_KEYS": "sk-test=tenant-a"})
    try:
        line = ""
        for line in proc.stdout:
            if "serving sessions on" in line:
                break
        url = line.split("OpenAI-compatible API on ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        with openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0) as client:
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
            assert r.usage.completion_tokens >= 1
        with openai.OpenAI(base_url=url, api_key="sk-wrong", max_retries=0) as client, \
                pytest.raises(openai.AuthenticationError):
            client.models.list()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert "shutting down" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
