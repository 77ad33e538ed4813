// Node.js interop client: calls TaskService (Classify, SummarizeStream, Summarize) using nothing but
// protos/genloom/v1/*.proto.
//
// Run by tests/node/test_node_clients.py as `node tests/node/tasks_client.mjs` with GENLOOM_TARGET=host:port (a server
// hosting the tokenizer, inference and task services). Prints ONE JSON object on stdout (the requests it sent, the
// classifications with every label's probability, the streamed summary's messages and the unary summary with their
// context reports) and exits 0; on any error prints it on stderr and exits 1.

import { connect, loadService, serverStream, unary, runMain } from "./grpc_helpers.mjs";

// Task RPCs call the inference service on the CPU: allow a slow machine more than the default 30 s.
const TIMEOUT_MS = 150_000;

export const CLASSIFY_REQUEST = {
  texts: ["I love this film, it was wonderful and moving.", "Terrible acting, boring plot, a waste of time."],
  labels: [{ name: "positive" }, { name: "negative" }],
  method: "CLASSIFY_METHOD_SCORE",
};

const DOCUMENT =
  "The quarterly planning meeting moved from Monday to Friday because the large conference room was booked. " +
  "Everyone must bring a laptop. The agenda covers the budget, hiring for the data team and the office move.";
const SAMPLING = { max_new_tokens: 24, temperature: 0 };

export const SUMMARIZE_STREAM_REQUEST = { document: DOCUMENT, sampling: SAMPLING };
export const SUMMARIZE_REQUEST = { documents: [DOCUMENT], sampling: SAMPLING };

async function main() {
  const target = process.env.GENLOOM_TARGET;
  if (!target) {
    throw new Error("GENLOOM_TARGET is not set (expected host:port of a genloom server)");
  }
  const TaskService = loadService("genloom/v1/tasks.proto", "genloom.v1.TaskService");
  const tasks = connect(TaskService, target);

  const classified = await unary(tasks, "Classify", CLASSIFY_REQUEST, TIMEOUT_MS);
  const messages = await serverStream(tasks, "SummarizeStream", SUMMARIZE_STREAM_REQUEST, () => {}, TIMEOUT_MS);
  const summarized = await unary(tasks, "Summarize", SUMMARIZE_REQUEST, TIMEOUT_MS);
  const finish = messages.find((m) => m.event === "finish")?.finish ?? null;
  const [summary] = summarized.results;

  return {
    classify: {
      request: CLASSIFY_REQUEST,
      model: classified.model,
      results: classified.results.map((result) => ({
        label: result.label,
        labels: result.labels,
        probabilities: result.probabilities.map((p) => ({
          label: p.label,
          probability: p.probability,
          logprob: p.logprob,
        })),
        context: result.context,
      })),
    },
    summarize_stream: {
      request: SUMMARIZE_STREAM_REQUEST,
      kinds: messages.map((m) => m.event),
      text: messages
        .filter((m) => m.event === "delta")
        .map((m) => m.delta.text)
        .join(""),
      finish_reason: finish?.finish_reason ?? null,
      context: finish?.context ?? null,
      usage: finish?.usage ?? null,
    },
    summarize: {
      request: SUMMARIZE_REQUEST,
      model: summarized.model,
      summary: summary?.summary ?? null,
      finish_reason: summary?.finish_reason ?? null,
      context: summary?.context ?? null,
      usage: summary?.usage ?? null,
    },
  };
}

await runMain("tasks_client", main);
