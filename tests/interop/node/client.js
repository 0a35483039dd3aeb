// Calls the sidecar daemon from Node.js: the .proto is loaded at run time (no generated
// code), the channel is the daemon's Unix socket. Prints one JSON line per call, so the
// Python test can compare the answers with its own client's.
//
//   node client.js /path/to/sidecar.sock
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = path.resolve(__dirname, "../../../protos");

function load() {
  const definition = protoLoader.loadSync("sidecar/v1/inference.proto", {
    includeDirs: [PROTOS],
    keepCase: true, // field names exactly as in the .proto (max_tokens, json_schema)
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).sidecar.v1;
}

// grpc-js is callback-based; a promise per unary call keeps the flow readable.
function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + 120_000 }, (err, reply) =>
      err ? reject(err) : resolve(reply),
    );
  });
}

function stream(client, method, request) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    const call = client[method](request, { deadline: Date.now() + 120_000 });
    call.on("data", (chunk) => chunks.push(chunk));
    call.on("error", reject);
    call.on("end", () => resolve(chunks));
  });
}

const LABELS = ["lost_or_stolen_card", "card_arrival", "exchange_rate"];
const SCHEMA = {
  type: "object",
  properties: { vendor: { type: "string" }, total: { type: "number" } },
  required: ["vendor", "total"],
  additionalProperties: false,
};

async function main() {
  const socket = process.argv[2];
  if (!socket) throw new Error("usage: node client.js SOCKET");
  const v1 = load();
  // "unix:" + an absolute path: grpc-js's target syntax for a Unix domain socket.
  const client = new v1.Inference(`unix:${socket}`, grpc.credentials.createInsecure());
  const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

  const c = await unary(client, "Classify", {
    text: "I think someone stole my card",
    labels: LABELS,
  });
  out({ call: "Classify", label: c.label, scores: c.scores, version: c.model.version });

  const e = await unary(client, "Extract", {
    text: "Invoice from Northwind Traders, total due 1250.00 EUR.",
    json_schema: JSON.stringify(SCHEMA),
    max_tokens: 64,
  });
  out({ call: "Extract", json: e.json, schema: SCHEMA });

  const chunks = await stream(client, "GenerateStream", {
    prompt: "The capital of France is",
    max_tokens: 12,
  });
  const pieces = chunks.filter((ch) => !ch.summary).map((ch) => ch.text);
  const summary = chunks[chunks.length - 1].summary;
  out({
    call: "GenerateStream",
    chunks: pieces.length,
    text: pieces.join(""),
    summary_text: summary.text,
    finish_reason: summary.finish_reason,
  });

  // A bad request: the daemon answers INVALID_ARGUMENT (3) with a message saying what to fix.
  try {
    await unary(client, "Classify", { text: "x", labels: ["only_one"] });
    out({ call: "BadClassify", code: 0 });
  } catch (err) {
    out({ call: "BadClassify", code: err.code, details: err.details });
  }
  client.close();
}

main().catch((err) => {
  process.stderr.write(`error: ${err.code ?? ""} ${err.details ?? err.message}\n`);
  process.exit(1);
});
