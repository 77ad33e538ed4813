"""Interop: Node.js clients that know nothing but protos/genloom/v1/*.proto call the genloom services.

tests/node/*_client.mjs load the .proto files at run time with @grpc/proto-loader (no generated code, no genloom
package), call a real server and print what they got as one JSON object; these tests check that against
transformers, the Python SDK and the task service's contract. Their dependencies are installed by `make node-deps`
(npm ci in tests/node); without them the tests fail rather than skip, so a missing setup cannot pass silently.
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

from ..conftest import DEFAULT_MODEL, ServerThread, tokenizer_service

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
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

    from ..conftest import start_server

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


def test_node_client_calls_the_task_service(default_model_dir: Path) -> None:
    """Classify, SummarizeStream and Summarize from Node.js against tokenizer + inference (hf) + tasks."""
    from genloom.services.inference.servicer import InferenceServicer
    from genloom.services.inference.settings import InferenceSettings
    from genloom.services.server.settings import ModelSettings
    from genloom.services.tasks.servicer import TaskServicer
    from genloom.services.tasks.settings import TasksSettings

    from ..conftest import start_server

    models = ModelSettings(model=DEFAULT_MODEL, model_cache=default_model_dir.parent)
    server = start_server(
        [
            tokenizer_service(default_model_dir),
            InferenceServicer(models, InferenceSettings(engine="hf")),
            TaskServicer(TasksSettings()),
        ]
    )
    try:
        server.wait_ready()
        result = run_node_client(server.target, NODE_DIR / "tasks_client.mjs")
    finally:
        server.stop()

    # Classify: one result per text, a probability for every label in request order, summing to 1 (single-label),
    # the label being the argmax; the score method reserves no generation tokens.
    classify = result["classify"]
    labels = [label["name"] for label in classify["request"]["labels"]]
    assert classify["model"]["model"] == DEFAULT_MODEL
    assert len(classify["results"]) == len(classify["request"]["texts"]) == 2
    for item in classify["results"]:
        probabilities = {p["label"]: p["probability"] for p in item["probabilities"]}
        assert [p["label"] for p in item["probabilities"]] == labels
        assert all(0.0 <= p <= 1.0 for p in probabilities.values())
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-6)
        assert item["label"] == max(probabilities, key=probabilities.__getitem__)
        assert item["labels"] == [item["label"]]
        assert all(p["logprob"] <= 0.0 for p in item["probabilities"])
        assert item["context"]["prompt_tokens"] > 0 and item["context"]["max_new_tokens"] == 0
    assert [item["label"] for item in classify["results"]] == ["positive", "negative"]

    # Summarize (unary): non-empty text, a context report that measured the prompt, at most max_new_tokens.
    summarize = result["summarize"]
    max_new_tokens = summarize["request"]["sampling"]["max_new_tokens"]
    summary = summarize["summary"]
    assert summary and summary == summary.strip() and "\ufffd" not in summary
    context = summarize["context"]
    assert context["prompt_tokens"] > 0 and context["input_tokens"] > 0
    assert context["prompt_tokens"] + max_new_tokens <= context["context_window"]
    assert context["chunks"] == 1 and context["examples_used"] == 0 and context["model_calls"] == 1
    assert summarize["usage"]["prompt_tokens"] == context["prompt_tokens"]
    assert 0 < summarize["usage"]["completion_tokens"] <= max_new_tokens
    assert summarize["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")

    # SummarizeStream: deltas then one finish (no progress: the document fits whole); greedy, so the deltas join
    # to the unary summary and the finish reports the same context, usage and finish reason.
    stream = result["summarize_stream"]
    assert stream["kinds"][-1] == "finish" and set(stream["kinds"][:-1]) == {"delta"}
    assert stream["text"] == summary
    assert stream["context"] == context
    assert stream["usage"] == summarize["usage"]
    assert stream["finish_reason"] == summarize["finish_reason"]
