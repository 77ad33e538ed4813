// Helpers shared by the Node.js interop clients: load services straight from protos/ (no generated code, no
// genloom package), connect, and call unary and server-streaming methods with deadlines.

import path from "node:path";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

export { grpc };

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
export function loadService(protoFile, serviceName) {
  const definition = protoLoader.loadSync(path.join(PROTOS_ROOT, protoFile), LOADER_OPTIONS);
  const service = serviceName.split(".").reduce((node, part) => node?.[part], grpc.loadPackageDefinition(definition));
  if (typeof service !== "function") {
    throw new Error(`service ${serviceName} not found in ${protoFile}`);
  }
  return service;
}

const clients = [];

/** Connects a client of the given service to the target, without TLS. Closed by closeAll(). */
export function connect(Service, target) {
  const client = new Service(target, grpc.credentials.createInsecure());
  clients.push(client);
  return client;
}

export function closeAll() {
  for (const client of clients.splice(0)) {
    client.close();
  }
}

/** Per-call options: every call gets a deadline. */
export function callOptions(timeoutMs = DEADLINE_MS) {
  return { deadline: new Date(Date.now() + timeoutMs) };
}

/** Calls a unary method and resolves with its response (rejects with the grpc ServiceError). */
export function unary(client, method, request, timeoutMs = DEADLINE_MS) {
  return new Promise((resolve, reject) => {
    client[method](request, callOptions(timeoutMs), (error, response) => (error ? reject(error) : resolve(response)));
  });
}

/**
 * Calls a server-streaming method and resolves with every message, in order (rejects with the grpc ServiceError).
 * @param {(message: object) => void} [onMessage] called as each message arrives
 */
export function serverStream(client, method, request, onMessage = () => {}, timeoutMs = DEADLINE_MS) {
  return new Promise((resolve, reject) => {
    const messages = [];
    const call = client[method](request, callOptions(timeoutMs));
    call.on("data", (message) => {
      messages.push(message);
      onMessage(message);
    });
    call.on("error", reject);
    call.on("end", () => resolve(messages));
  });
}

/**
 * Runs a client's main(): prints its result as one JSON line on stdout (exit 0), or the error with its gRPC
 * status on stderr (exit 1); closes every client either way.
 * @param {string} name the client's name, for error messages
 * @param {() => Promise<unknown>} main
 */
export async function runMain(name, main) {
  try {
    const result = await main();
    process.stdout.write(`${JSON.stringify(result)}\n`);
    process.exitCode = 0;
  } catch (error) {
    const status = typeof error?.code === "number" ? ` (gRPC status ${error.code}: ${error.details})` : "";
    process.stderr.write(`${name}: ${error?.stack ?? error}${status}\n`);
    process.exitCode = 1;
  } finally {
    closeAll();
  }
}
