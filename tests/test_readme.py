"""A newcomer's first answer: the README's requests, as written, against `splitserve up` with
its default model (SmolLM2-135M-Instruct, pulled once) and nothing else given."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.router_helpers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.network]

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
DEMO_URL = "http://127.0.0.1:8000"


def readme_blocks(lang: str, containing: str) -> list[str]:
    blocks = re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)
    found = [b for b in blocks if containing in b]
    assert found, f"the README has no {lang} block with {containing!r}"
    return found


@pytest.fixture(scope="module")
def demo(smollm2_dir):
    """`splitserve up` as scripts/demo.sh runs it, on free ports instead of 8000/50051."""
    port = free_port()
    cmd = [sys.executable, "-m", "splitserve.cli", "up", "--port", str(port), "--grpc-port",
           str(free_port())]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
    url = proc.stdout.readline().strip()
    if url != f"http://127.0.0.1:{port}":
        proc.kill()
        pytest.fail(f"splitserve up did not come up: {''.join(stderr)[-3000:]}")
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(90)
    finally:
        proc.kill()


def as_written(block: str, url: str) -> str:
    assert DEMO_URL in block
    return block.replace(DEMO_URL, url)


def test_the_readme_curl_answers_sensibly(demo):
    """No temperature, no max_tokens: the model's defaults give its sensible answer, and the
    request ends on its own (EOS), far before the cap."""
    plain, streamed = readme_blocks("bash", "curl http://127.0.0.1:8000/v1/chat/completions")
    out = subprocess.run(["bash", "-c", as_written(plain, demo)], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["choices"][0]["message"]["content"] == "The capital of France is Paris."
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] < 32

    out = subprocess.run(["bash", "-c", as_written(streamed, demo)], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    events = [ln.removeprefix("data: ") for ln in out.stdout.splitlines() if ln.strip()]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "The capital of France is Paris."
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_the_readme_python_client_answers_sensibly(demo):
    [snippet] = readme_blocks("python", "from openai import OpenAI")
    out = subprocess.run([sys.executable, "-c", as_written(snippet, demo)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == "The capital of France is Paris."
