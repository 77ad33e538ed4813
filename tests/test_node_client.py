"""Interop: a Node.js client that knows nothing but protos/genloom/v1/*.proto calls the tokenizer service.

tests/node/tokenizer_client.mjs loads the .proto files at run time with @grpc/proto-loader (no generated code, no
genloom package), calls a real server and prints what it got as one JSON object; this test checks that against
transformers. Its dependencies are installed by `make node-deps` (npm install in tests/node); without them the test
fails rather than skips, so a missing setup cannot pass silently.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

import genloom

from .conftest import DEFAULT_MODEL, ServerThread

REPO_ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = REPO_ROOT / "tests" / "node"
CLIENT = NODE_DIR / "tokenizer_client.mjs"
ROLES = {"ROLE_SYSTEM": "system", "ROLE_USER": "user", "ROLE_ASSISTANT": "assistant"}
NOT_FOUND = 5  # grpc.StatusCode.NOT_FOUND


def run_node_client(target: str, client: Path = CLIENT) -> dict[str, Any]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: the Node.js interop test needs Node.js 18+ (then run `make node-deps`)")
    if not (NODE_DIR / "node_modules").is_dir():
        pytest.fail(f"{NODE_DIR / 'node_modules'} is missing: run `make node-deps` (npm install in tests/node) first")
    proc = subprocess.run(
        [node, str(client.relative_to(REPO_ROOT))],
        cwd=REPO_ROOT,
        env={**os.environ, "GENLOOM_TARGET": target},
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, f"node client exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line on stdout, got:\n{proc.stdout}"
    result: dict[str, Any] = json.loads(lines[0])
    return result


def test_node_client_tokenizes_like_transformers(tokenizer_server: ServerThread, default_model_dir: Path) -> None:
    result = run_node_client(tokenizer_server.target)
    tok = AutoTokenizer.from_pretrained(str(default_model_dir))

    # The client echoes the TokenizerInput messages it sent: two texts (one multi-byte) and one conversation.
    inputs = result["inputs"]
    texts = [i["text"] for i in inputs if "text" in i]
    conversations = [i["conversation"]["messages"] for i in inputs if "conversation" in i]
    assert len(texts) == 2 and len(conversations) == 1 and len(inputs) == 3
    assert any(not t.isascii() for t in texts)
    messages = [{"role": ROLES[m["role"]], "content": m["content"]} for m in conversations[0]]
    assert any(m["role"] == "user" for m in messages)

    expected = []
    for item in inputs:
        if "text" in item:
            expected.append(tok(item["text"])["input_ids"])
        else:
            prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            expected.append(tok(prompt, add_special_tokens=False)["input_ids"])

    assert result["model"] == DEFAULT_MODEL
    assert result["tokenize"] == expected
    assert result["counts"] == [len(ids) for ids in expected]
    assert int(result["total"]) == sum(len(ids) for ids in expected)  # uint64: a decimal string in JS
    assert result["context_window"] == 8192
    assert result["not_found_code"] == NOT_FOUND


def test_node_client_streams_generate_stream(default_model_dir: Path) -> None:
    """GenerateStream from Node.js: deltas then one finish, text equal to the SDK's unary Generate."""
    from genloom.services.inference.servicer import InferenceServicer
    from genloom.services.inference.settings import InferenceSettings
    from genloom.services.server.settings import ModelSettings

    from .conftest import start_server

    models = ModelSettings(model=DEFAULT_MODEL, model_cache=default_model_dir.parent)
    server = start_server([InferenceServicer(models, InferenceSettings(engine="hf"))])
    try:
        server.wait_ready()
        result = run_node_client(server.target, NODE_DIR / "inference_stream_client.mjs")
        with genloom.Client(target=server.target) as client:
            messages = result["request"]["prompt"]["conversation"]["messages"]
            unary = client.inference.generate(
                [{"role": ROLES[m["role"]], "content": m["content"]} for m in messages],
                max_new_tokens=result["request"]["sampling"]["max_new_tokens"],
                temperature=0,
            )
    finally:
        server.stop()
    assert result["kinds"][-1] == "finish" and set(result["kinds"][:-1]) == {"delta"}
    assert result["request_ids"] == [result["request"]["request_id"]]
    assert result["token_ids"] == unary.token_ids
    assert result["text"] == unary.text and "\ufffd" not in result["text"]
    assert result["finish_reason"] == f"FINISH_REASON_{unary.finish_reason.upper()}"
    assert result["completion_tokens"] == len(unary.token_ids)
