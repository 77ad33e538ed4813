// Node.js interop client for genloom: calls the services using nothing but the .proto files in protos/.
//
// No generated code and no genloom package: @grpc/proto-loader reads protos/genloom/v1/*.proto at run time.
// Run by tests/node/test_node_clients.py as `node tests/node/tokenizer_client.mjs` with GENLOOM_TARGET=host:port.
// Prints ONE JSON object on stdout and exits 0; on any error prints it on stderr and exits 1.
//
// The shared helpers (loading services from the protos, deadlines, unary and streaming calls) are in
// grpc_helpers.mjs; inference_stream_client.mjs streams InferenceService.GenerateStream the same way.

import { connect, grpc, loadService, unary, runMain } from "./grpc_helpers.mjs";

// The inputs: two plain texts (one with multi-byte UTF-8, including a character outside the BMP, which is a
// surrogate pair in JavaScript strings) and one conversation, as TokenizerInput messages.
const INPUTS = [
  { text: "Hello from Node.js!" },
  { text: "héllo 世界, ünïcödé and 🚀" },
  {
    conversation: {
      messages: [
        { role: "ROLE_SYSTEM", content: "You are terse." },
        { role: "ROLE_USER", content: "Say héllo in 世界 words." },
      ],
    },
  },
];

async function main() {
  const target = process.env.GENLOOM_TARGET;
  if (!target) {
    throw new Error("GENLOOM_TARGET is not set (expected host:port of a genloom server)");
  }
  const TokenizerService = loadService("genloom/v1/tokenizer.proto", "genloom.v1.TokenizerService");
  const tokenizer = connect(TokenizerService, target);

  const tokenized = await unary(tokenizer, "Tokenize", { inputs: INPUTS });
  const counted = await unary(tokenizer, "CountTokens", { inputs: INPUTS });

  // An unknown model must fail with NOT_FOUND; a success is reported as OK (0) so the test shows it.
  let notFoundCode = grpc.status.OK;
  try {
    await unary(tokenizer, "Tokenize", { model: "no-such-model", inputs: INPUTS.slice(0, 1) });
  } catch (error) {
    if (typeof error?.code !== "number") {
      throw error;
    }
    notFoundCode = error.code;
  }

  return {
    inputs: INPUTS,
    model: tokenized.model,
    tokenize: tokenized.results.map((result) => result.ids),
    counts: counted.counts,
    total: counted.total,
    context_window: counted.context_window,
    not_found_code: notFoundCode,
  };
}

await runMain("tokenizer_client", main);
