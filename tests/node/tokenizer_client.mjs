// Node.js interop client for genloom: calls the services using nothing but the .proto files in protos/.
//
// No generated code and no genloom package: @grpc/proto-loader reads protos/genloom/v1/*.proto at run time.
// Run by tests/test_node_client.py as `node tests/node/tokenizer_client.mjs` with GENLOOM_TARGET=host:port.
// Prints ONE JSON object on stdout and exits 0; on any error prints it on stderr and exits 1.
//
// To call another service, load it with loadService() and connect with connect(), e.g.
//   const InferenceService = loadService("genloom/v1/inference.proto", "genloom.v1.InferenceService");
// then add a helper next to unary() for server-streaming calls (client.GenerateStream(request, callOptions())
// returns a readable stream of responses: listen for "data", "error" and "end").

import path from "node:path";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const HERE = path.dirname(fileURLToPath(import.meta.url));
// The protos root: imports such as `import "genloom/v1/common.proto"` resolve against it.
const PROTOS_ROOT = path.resolve(HERE, "..", "..", "protos");
const DEADLINE_MS = 30_000;

const LOADER_OPTIONS = {
  includeDirs: [PROTOS_ROOT],
  keepCase: true, // field names as in the .proto (context_window, not contextWindow)
  longs: String, // 64-bit integers (e.g. CountTokensResponse.total) as decimal strings, never lossy
  enums: String, // enum values by name ("ROLE_USER")
  defaults: true, // unset fields come back as their proto3 defaults
  oneofs: true, // a virtual field names the member that is set (TokenizerInput.input = "text" | "conversation")
};

/**
 * Loads a service definition straight from a .proto file.
 * @param {string} protoFile path relative to the protos root, e.g. "genloom/v1/tokenizer.proto"
 * @param {string} serviceName fully qualified, e.g. "genloom.v1.TokenizerService"
 * @returns {typeof grpc.Client} a client constructor: new Service(target, credentials)
 */
function loadService(protoFile, serviceName) {
  const definition = protoLoader.loadSync(path.join(PROTOS_ROOT, protoFile), LOADER_OPTIONS);
  const service = serviceName.split(".").reduce((node, part) => node?.[part], grpc.loadPackageDefinition(definition));
  if (typeof service !== "function") {
    throw new Error(`service ${serviceName} not found in ${protoFile}`);
  }
  return service;
}

const clients = [];

/** Connects a client of the given service to the target, without TLS. Closed by closeAll(). */
function connect(Service, target) {
  const client = new Service(target, grpc.credentials.createInsecure());
  clients.push(client);
  return client;
}

function closeAll() {
  for (const client of clients.splice(0)) {
    client.close();
  }
}

/** Per-call options: every call gets a deadline. */
function callOptions(timeoutMs = DEADLINE_MS) {
  return { deadline: new Date(Date.now() + timeoutMs) };
}

/** Calls a unary method and resolves with its response (rejects with the grpc ServiceError). */
function unary(client, method, request, timeoutMs = DEADLINE_MS) {
  return new Promise((resolve, reject) => {
    client[method](request, callOptions(timeoutMs), (error, response) => (error ? reject(error) : resolve(response)));
  });
}

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

try {
  const result = await main();
  process.stdout.write(`${JSON.stringify(result)}\n`);
  process.exitCode = 0;
} catch (error) {
  const status = typeof error?.code === "number" ? ` (gRPC status ${error.code}: ${error.details})` : "";
  process.stderr.write(`tokenizer_client: ${error?.stack ?? error}${status}\n`);
  process.exitCode = 1;
} finally {
  closeAll();
}
