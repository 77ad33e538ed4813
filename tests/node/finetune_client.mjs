// Node.js interop client: submits a fine-tuning job to FineTuningService and follows it with WatchJob to its end,
// using nothing but protos/genloom/v1/*.proto (other languages put jobs on the same queue as the Python SDK).
//
// Run by tests/finetune/test_node_finetune.py as `node tests/node/finetune_client.mjs` with
// GENLOOM_TARGET=host:port (a server hosting FineTuningService, with a worker on its queue) and
// GENLOOM_FT_RECORDS=<JSON array of {"prompt", "completion"} records>. The records are sent inline as JSONL bytes.
// Prints ONE JSON object on stdout (the request it sent, the created job, every streamed event in order and a
// summary: state-change sequence, event ids, metrics count, result model) and exits 0; on any error prints it on
// stderr and exits 1.

import { connect, loadService, serverStream, unary, runMain } from "./grpc_helpers.mjs";

// A tiny model trains in seconds, but the worker loads the model and saves the result on a shared 2-core machine.
const WATCH_TIMEOUT_MS = 240_000;
const TERMINAL = new Set(["JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"]);

// Small enough for a tiny random model on a CPU; everything else takes the documented defaults.
export const HYPERPARAMETERS = {
  max_steps: 6,
  batch_size: 4,
  learning_rate: 0.01,
  max_seq_length: 64,
  checkpoint_interval_steps: 3,
  seed: 7,
};
export const BASE_MODEL = "tiny-llama";
export const SUFFIX = "node";

function readRecords() {
  const raw = process.env.GENLOOM_FT_RECORDS;
  if (!raw) {
    throw new Error("GENLOOM_FT_RECORDS is not set (expected a JSON array of prompt/completion records)");
  }
  const records = JSON.parse(raw);
  if (!Array.isArray(records) || records.length === 0) {
    throw new Error("GENLOOM_FT_RECORDS must be a non-empty JSON array");
  }
  return records;
}

/** A google.protobuf.Timestamp (seconds as a decimal string: longs are strings) in epoch milliseconds. */
function millis(timestamp) {
  return timestamp ? Number(timestamp.seconds) * 1000 + Math.floor(timestamp.nanos / 1e6) : null;
}

async function main() {
  const target = process.env.GENLOOM_TARGET;
  if (!target) {
    throw new Error("GENLOOM_TARGET is not set (expected host:port of a genloom server)");
  }
  const records = readRecords();
  const jsonl = Buffer.from(records.map((r) => `${JSON.stringify(r)}\n`).join(""), "utf-8");
  const FineTuningService = loadService("genloom/v1/finetune.proto", "genloom.v1.FineTuningService");
  const finetune = connect(FineTuningService, target);

  const request = {
    spec: {
      base_model: BASE_MODEL,
      training_data: { jsonl },
      hyperparameters: HYPERPARAMETERS,
      suffix: SUFFIX,
    },
    idempotency_key: `node-${process.pid}-${Date.now()}`,
  };
  const created = await unary(finetune, "CreateJob", request);
  const job = created.job;

  const responses = await serverStream(finetune, "WatchJob", { job_id: job.id }, () => {}, WATCH_TIMEOUT_MS);
  const events = responses.map(({ event }) => ({
    id: event.id,
    job_id: event.job_id,
    type: event.type,
    level: event.level,
    state: event.state,
    message: event.message,
    created_at_ms: millis(event.created_at),
    step: event.type === "JOB_EVENT_TYPE_METRICS" ? Number(event.metrics.step) : null,
    result_model: event.result_model,
  }));
  const stateChanges = events.filter((e) => e.type === "JOB_EVENT_TYPE_STATE_CHANGE");
  const last = stateChanges.at(-1) ?? null;

  return {
    request: {
      base_model: BASE_MODEL,
      suffix: SUFFIX,
      hyperparameters: HYPERPARAMETERS,
      records: records.length,
      jsonl_bytes: jsonl.length,
      idempotency_key: request.idempotency_key,
    },
    created: {
      id: job.id,
      created: created.created,
      state: job.state,
      training_data_path: job.spec.training_data.path ?? "",
      training_data_source: job.spec.training_data.source ?? null,
      max_steps: job.spec.hyperparameters.max_steps,
      lora_rank: job.spec.hyperparameters.lora_rank,
      last_event_id: job.last_event_id,
    },
    job_id: job.id,
    events,
    event_ids: events.map((e) => e.id),
    states: stateChanges.map((e) => e.state),
    metrics_events: events.filter((e) => e.type === "JOB_EVENT_TYPE_METRICS").length,
    terminal: last !== null && TERMINAL.has(last.state) ? last.state : null,
    result_model: last?.result_model ?? "",
  };
}

await runMain("finetune_client", main);
