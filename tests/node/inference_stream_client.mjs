// Node.js interop client: streams InferenceService.GenerateStream using nothing but protos/genloom/v1/*.proto.
//
// Run by tests/node/test_node_clients.py as `node tests/node/inference_stream_client.mjs` with GENLOOM_TARGET=host:port.
// Prints ONE JSON object on stdout (the streamed text, token ids, message kinds and the finish) and exits 0; on
// any error prints it on stderr and exits 1.

import { connect, loadService, serverStream, runMain } from "./grpc_helpers.mjs";

export const REQUEST = {
  request_id: "node-stream-1",
  prompt: { conversation: { messages: [{ role: "ROLE_USER", content: "Say héllo to 世界 in five words." }] } },
  sampling: { max_new_tokens: 24, temperature: 0 },
};

async function main() {
  const target = process.env.GENLOOM_TARGET;
  if (!target) {
    throw new Error("GENLOOM_TARGET is not set (expected host:port of a genloom server)");
  }
  const InferenceService = loadService("genloom/v1/inference.proto", "genloom.v1.InferenceService");
  const inference = connect(InferenceService, target);
  const messages = await serverStream(inference, "GenerateStream", REQUEST, () => {}, 120_000);
  const deltas = messages.filter((m) => m.event === "delta").map((m) => m.delta);
  const finish = messages.find((m) => m.event === "finish")?.finish ?? null;
  return {
    request: REQUEST,
    kinds: messages.map((m) => m.event),
    request_ids: [...new Set(messages.map((m) => m.request_id))],
    text: deltas.map((d) => d.text).join(""),
    token_ids: deltas.flatMap((d) => d.token_ids),
    finish_reason: finish?.finish_reason ?? null,
    completion_tokens: finish?.usage?.completion_tokens ?? null,
  };
}

await runMain("inference_stream_client", main);
