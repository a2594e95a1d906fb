#!/usr/bin/env node
// A chainrule client in Node.js, written from the contract alone
// (proto/chainrule/v1/chainrule.proto and the google.rpc files it imports,
// in proto/third_party): the .proto files are loaded at run time
// (@grpc/proto-loader); no code is generated. docs/quickstart-other-languages.md
// explains it.
//
//   npm ci && node client.js [--json] [--include DIR] [ADDRESS]   (ADDRESS: 127.0.0.1:50051)
//
// 1. Evaluates the staged circuit of the lecture notes,
//    f(x, y) = (x + sigmoid(y)) / (sigmoid(x) + (x + y)^2) at x = 3, y = -4,
//    and prints the output, every value and every gradient.
// 2. Sends a request with a typo in an operator's name and decodes the rich
//    error from the `grpc-status-details-bin` trailer: google.rpc.Status, then
//    its details (google.protobuf.Any) by type URL: google.rpc.ErrorInfo
//    (reason, metadata) and google.rpc.BadRequest (field violations).
//
// --json prints one JSON document instead of text. Numbers are printed as
// JavaScript prints doubles: the shortest text that reads back as the same
// 64 bits, so nothing is rounded away.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const REPO = path.resolve(__dirname, '..', '..');
// chainrule.proto imports google/rpc/status.proto and error_details.proto
// (ErrorInfo, BadRequest): loading it loads those too.
const PROTO_FILE = 'chainrule/v1/chainrule.proto';

// ---------------------------------------------------------------------------
// Loading the contract
// ---------------------------------------------------------------------------

// The folder holding google/rpc/status.proto and error_details.proto:
// --include DIR (or CHAINRULE_PROTO_INCLUDE) when given, else the copy the
// repository ships in proto/third_party. Elsewhere, the same files come with
// the Python package googleapis-common-protos (in site-packages) and the npm
// package google-proto-files (node_modules/google-proto-files).
function googleProtosDir(explicit) {
  const dir = explicit || process.env.CHAINRULE_PROTO_INCLUDE || path.join(REPO, 'proto', 'third_party');
  if (!fs.existsSync(path.join(dir, 'google', 'rpc', 'error_details.proto'))) {
    throw new Error(`${dir} has no google/rpc/error_details.proto: pass --include DIR, a folder that has`);
  }
  return dir;
}

// The proto-loader options, and why:
// - keepCase: field names as the .proto spells them (output_value,
//   return_grads), not camelCase: the names in this file are the proto's.
// - longs: String: int64 fields (Tensor.shape, counts, indexes) arrive as
//   decimal strings. A JS number is exact only up to 2^53; the default would
//   be Long objects. Requests may give int64 fields as numbers or strings.
// - enums: String: enum fields arrive as their names ("FLOAT64", not 1).
//   Requests may give names or numbers.
// - oneofs: true: each oneof also gets a virtual field naming the member
//   that is set: tensor.payload is 'data', 'values' or 'shared_memory';
//   EvaluateStreamResponse.result is 'response' or 'error'.
// - arrays / objects: an empty repeated field or map arrives as [] or {}
//   instead of being absent: a scalar's shape is [], not undefined.
// - defaults stays false: a field the server did not set stays absent, so
//   "unset" (e.g. Diagnostics.first_nonfinite_value) can be told from zero.
// bytes fields arrive as Buffers (the default); requests take Buffers too.
const LOADER_OPTIONS = { keepCase: true, longs: String, enums: String, oneofs: true, arrays: true, objects: true };

function loadContract(includeDir) {
  const includeDirs = [path.join(REPO, 'proto'), googleProtosDir(includeDir)];
  const definition = protoLoader.loadSync(PROTO_FILE, { ...LOADER_OPTIONS, includeDirs });
  const chainrule = grpc.loadPackageDefinition(definition).chainrule.v1;
  // proto-loader builds (de)serializers for the service's messages only; the
  // error details travel as bytes outside any call, so decode them with
  // protobufjs (the library proto-loader is built on) from the same files.
  const root = new protobuf.Root();
  root.resolvePath = (origin, target) => {
    for (const dir of includeDirs) {
      if (fs.existsSync(path.join(dir, target))) return path.join(dir, target);
    }
    return protobuf.util.path.resolve(origin, target);
  };
  root.loadSync(PROTO_FILE, { keepCase: true });
  return { chainrule, root };
}

// ---------------------------------------------------------------------------
// Tensors: raw little-endian bytes, C order
// ---------------------------------------------------------------------------

const ITEM = {
  FLOAT64: [8, (b, o) => b.readDoubleLE(o), (b, v, o) => b.writeDoubleLE(v, o)],
  FLOAT32: [4, (b, o) => b.readFloatLE(o), (b, v, o) => b.writeFloatLE(v, o)],
  INT64: [8, (b, o) => b.readBigInt64LE(o).toString(), (b, v, o) => b.writeBigInt64LE(BigInt(v), o)],
  INT32: [4, (b, o) => b.readInt32LE(o), (b, v, o) => b.writeInt32LE(v, o)],
  BOOL: [1, (b, o) => b.readUInt8(o) !== 0, (b, v, o) => b.writeUInt8(v ? 1 : 0, o)],
};

// A Tensor message from a flat array of elements: the raw bytes go in `data`
// (little-endian whatever this machine's byte order; Buffer's *LE methods say so).
function tensor(elements, shape = [], dtype = 'FLOAT64') {
  const [size, , write] = ITEM[dtype];
  const flat = [].concat(elements);
  const data = Buffer.alloc(flat.length * size);
  flat.forEach((v, i) => write(data, v, i * size));
  return { dtype, shape, data };
}

// A Tensor message's elements: a number for a scalar, else nested arrays.
// Reads either payload: `data` (what the server sends by default) or `values`
// (JSON-friendly doubles).
function decode(t) {
  const dtype = t.dtype || 'FLOAT64';
  const shape = (t.shape || []).map(Number);
  let flat;
  if (t.payload === 'data') {
    const [size, read] = ITEM[dtype];
    flat = Array.from({ length: t.data.length / size }, (_, i) => read(t.data, i * size));
  } else if (t.payload === 'values') {
    flat = t.values.values;
  } else if (t.payload === undefined) {
    flat = [];                                  // zero elements may come without a payload
  } else {
    throw new Error(`tensor payload ${t.payload} is not read by this example`);
  }
  const nest = (start, dims) => {
    if (dims.length === 0) return flat[start];
    const inner = dims.slice(1).reduce((a, b) => a * b, 1);
    return Array.from({ length: dims[0] }, (_, i) => nest(start + i * inner, dims.slice(1)));
  };
  return nest(0, shape);
}

// ---------------------------------------------------------------------------
// The staged circuit, as a chainrule.v1.Graph
// ---------------------------------------------------------------------------

function stagedCircuit() {
  const constant = (name, v) => ({ name, op: 'const', attrs: { value: { tensor: tensor(v) } } });
  return {
    inputs: [{ name: 'x', dtype: 'FLOAT64', shape: [] }, { name: 'y', dtype: 'FLOAT64', shape: [] }],
    nodes: [
      { name: 'sigy', op: 'sigmoid', inputs: ['y'] },
      { name: 'num', op: 'add', inputs: ['x', 'sigy'] },
      { name: 'sigx', op: 'sigmoid', inputs: ['x'] },
      { name: 'xpy', op: 'add', inputs: ['x', 'y'] },
      constant('two', 2),
      { name: 'xpysqr', op: 'pow', inputs: ['xpy', 'two'] },
      { name: 'den', op: 'add', inputs: ['sigx', 'xpysqr'] },
      constant('one', 1),
      { name: 'invden', op: 'div', inputs: ['one', 'den'] },
      { name: 'f', op: 'mul', inputs: ['num', 'invden'] },
    ],
    outputs: ['f'],
  };
}

// ---------------------------------------------------------------------------
// Errors: the grpc-status-details-bin trailer
// ---------------------------------------------------------------------------

// What a failed call says: its status, and the details the server packed into
// google.rpc.Status (each a google.protobuf.Any, decoded by its type URL).
function richError(err, root) {
  const out = { code: err.code, code_name: grpc.status[err.code], message: err.details };
  const [bin] = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (!bin) return out;                         // e.g. UNAUTHENTICATED, or not a chainrule server
  const Status = root.lookupType('google.rpc.Status');
  const status = Status.decode(bin);
  for (const any of status.details) {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    let type;
    try { type = root.lookupType(typeName); } catch (e) { (out.unknown_details ||= []).push(any.type_url); continue; }
    const detail = type.toObject(type.decode(any.value), { longs: String, enums: String, arrays: true, objects: true });
    if (typeName === 'google.rpc.ErrorInfo') out.error_info = detail;
    else if (typeName === 'google.rpc.BadRequest') out.field_violations = detail.field_violations;
    else (out.other_details ||= {})[typeName] = detail;
  }
  return out;
}

// ---------------------------------------------------------------------------
// The calls
// ---------------------------------------------------------------------------

function evaluate(client, request) {
  const deadline = new Date(Date.now() + 30_000);
  return new Promise((resolve, reject) => client.Evaluate(request, { deadline }, (err, res) => (err ? reject(err) : resolve(res))));
}

const byName = (map) => Object.fromEntries(Object.keys(map).sort().map((k) => [k, decode(map[k])]));

async function main() {
  const args = process.argv.slice(2);
  const json = args.includes('--json');
  const at = args.indexOf('--include');
  const include = at >= 0 ? args[at + 1] : undefined;
  const positional = args.filter((a, i) => !a.startsWith('--') && !(at >= 0 && i === at + 1));
  const address = positional[0] || '127.0.0.1:50051';

  const { chainrule, root } = loadContract(include);
  const client = new chainrule.Chainrule(address, grpc.credentials.createInsecure());
  const report = {};

  // 1. The staged circuit: every value and every gradient (Selection mode ALL).
  const response = await evaluate(client, {
    graph: stagedCircuit(),
    inputs: { x: tensor(3), y: tensor(-4) },
    return_values: { mode: 'ALL' },
    return_grads: { mode: 'ALL' },
  });
  report.evaluate = {
    output: response.output,
    value: decode(response.output_value),
    values: byName(response.values),
    gradients: byName(response.gradients),
    graph_id: response.graph_id,
  };

  // 2. A typo in the first node's operator: INVALID_ARGUMENT with details.
  const broken = stagedCircuit();
  broken.nodes[0].op = 'sigmod';
  try {
    await evaluate(client, { graph: broken, inputs: { x: tensor(3), y: tensor(-4) } });
    throw new Error('the broken request succeeded');
  } catch (err) {
    if (err.code === undefined) throw err;
    report.error = richError(err, root);
  }
  client.close();

  if (json) {
    console.log(JSON.stringify(report, null, 2));
    return;
  }
  const e = report.evaluate;
  console.log(`output ${e.output} = ${e.value}`);
  for (const [name, v] of Object.entries(e.values)) console.log(`value ${name} = ${JSON.stringify(v)}`);
  for (const [name, g] of Object.entries(e.gradients)) console.log(`gradient d${e.output}/d${name} = ${JSON.stringify(g)}`);
  const r = report.error;
  console.log(`error ${r.code_name} (${r.code}): ${r.message}`);
  if (r.error_info) {
    console.log(`  reason ${r.error_info.reason} (domain ${r.error_info.domain})`);
    for (const k of Object.keys(r.error_info.metadata).sort()) console.log(`  metadata ${k} = ${r.error_info.metadata[k]}`);
  }
  for (const v of r.field_violations || []) console.log(`  field ${v.field}: ${v.description}`);
}

main().catch((err) => {
  console.error(`chainrule example failed: ${err.message || err}`);
  process.exit(1);
});
