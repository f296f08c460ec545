// Tensors on the wire from Node, as docs/clients.md and TensorChunk in the .proto describe them:
// a tensor is dtype + shape + raw little-endian, row-major bytes; a stream of tensors is declared
// (its first chunk says how many tensors and bytes follow) and checksummed (the chunk that completes
// each tensor carries the CRC32C of its header and data). Shared by avgparms.js and upload.js.
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "proto");

// keepCase: false gives camelCase field names (intValue, chunkBytes), the protobuf JS convention.
// longs: Number is safe here: counts and shapes are far below 2^53. enums: String gives
// "DTYPE_FLOAT32" rather than 1 in replies. google/protobuf/struct.proto (imported for NullValue)
// is not in proto/: proto-loader ships the well-known types and resolves them itself. proto3
// `optional` fields (tensorCount, totalBytes, crc32c) come back null or undefined when absent.
const definition = protoLoader.loadSync("weightavg/v1/weightavg.proto", {
  includeDirs: [PROTO_ROOT],
  keepCase: false,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const weightavg = grpc.loadPackageDefinition(definition).weightavg.v1;
// Dtype names to their wire codes, which a tensor's checksum covers.
const DTYPE_CODES = Object.fromEntries(
  definition["weightavg.v1.Dtype"].type.value.map(({ name, number }) => [name, number]),
);
// CRC32C (Castagnoli, reflected polynomial 0x82F63B78, initial value and final XOR 0xFFFFFFFF: the
// CRC-32C of iSCSI, whose check value for the ASCII bytes "123456789" is 0xE3069283), continuing
// from `crc` (a previous result). A table-driven loop: plenty for an example's few bytes (a native
// package would be faster).
const CRC32C_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n += 1) {
    let c = n;
    for (let k = 0; k < 8; k += 1) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

function crc32c(bytes, crc = 0) {
  let c = ~crc >>> 0;
  for (let i = 0; i < bytes.length; i += 1) c = CRC32C_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return ~c >>> 0;
}

// A tensor's checksum covers its header, then its data (TensorChunk in the .proto), every integer
// little-endian: the name's UTF-8 length (uint32), the name, the dtype code (uint32), the number of
// dimensions (uint32), each dimension (int64). Continue it over the data with crc32c(data, headerCrc(...)).
function headerCrc(name, dtype, shape) {
  const nameBytes = Buffer.from(name, "utf8");
  const head = Buffer.alloc(12 + nameBytes.length + 8 * shape.length);
  let at = head.writeUInt32LE(nameBytes.length, 0);
  at += nameBytes.copy(head, at);
  at = head.writeUInt32LE(DTYPE_CODES[dtype], at);
  at = head.writeUInt32LE(shape.length, at);
  for (const d of shape) at = head.writeBigInt64LE(BigInt(d), at);
  return crc32c(head);
}

// The chunks of a declared stream of tensors ({name, dtype, shape, data: Buffer}), each tensor's data
// cut every `chunkBytes` bytes (any byte boundary will do, inside an element too). The stream's first
// chunk declares tensorCount and totalBytes (alone, for a stream of no tensor); each tensor's header
// chunk carries name, dtype, shape and its first bytes, unless its name and shape take more than 512
// bytes (each dimension counted as 10, a varint's most), so that no message is over a chunk plus 512
// bytes; the chunk that completes a tensor (the header of an empty one) carries its crc32c. Later
// chunks leave dtype unset (DTYPE_UNSPECIFIED) and never set tensorCount or totalBytes, not even to 0.
function tensorChunks(tensors, chunkBytes) {
  const totalBytes = tensors.reduce((n, t) => n + t.data.length, 0);
  if (tensors.length === 0) return [{ tensorCount: 0, totalBytes: 0 }];
  const chunks = [];
  for (const t of tensors) {
    const crc = crc32c(t.data, headerCrc(t.name, t.dtype, t.shape));
    const pieces = [];
    if (t.data.length > 0 && Buffer.byteLength(t.name, "utf8") + 10 * t.shape.length > 512) pieces.push(t.data.subarray(0, 0));
    for (let at = 0; at < t.data.length; at += chunkBytes) pieces.push(t.data.subarray(at, at + chunkBytes));
    if (pieces.length === 0) pieces.push(t.data); // an empty tensor: its header alone
    pieces.forEach((data, i) => {
      const chunk = { data };
      if (i === 0) Object.assign(chunk, { name: t.name, dtype: t.dtype, shape: t.shape });
      if (chunks.length === 0) Object.assign(chunk, { tensorCount: tensors.length, totalBytes });
      if (i === pieces.length - 1) chunk.crc32c = crc;
      chunks.push(chunk);
    });
  }
  return chunks;
}

// Reads a declared stream of chunks back into tensors, checking it as it goes: a chunk whose dtype is
// set starts a tensor (name, dtype, shape); every chunk's data, the header's included, appends to the
// current tensor; a chunk's `packed` chunks follow it, in order, exactly as if each had come in a
// message of its own. Each tensor's crc32c and the stream's declared count and bytes are checked;
// `finish()` returns {name: {dtype, shape, data}} or throws a DATA_LOSS error.
class StreamReader {
  constructor() {
    this.tensors = {};
    this.current = null;
    this.declared = null;
    this.count = 0;
    this.bytes = 0;
    this.verified = 0;
    this.largestChunk = 0;
    this.failure = null;
  }

  feed(chunk) {
    this.largestChunk = Math.max(this.largestChunk, chunk.data.length);
    const isSet = (value) => value !== undefined && value !== null;
    if (this.declared === null && isSet(chunk.tensorCount)) {
      this.declared = { count: Number(chunk.tensorCount), bytes: Number(chunk.totalBytes) };
    }
    if (chunk.dtype !== "DTYPE_UNSPECIFIED") {
      const shape = chunk.shape.map(Number);
      this.current = { name: chunk.name, dtype: chunk.dtype, shape, parts: [], crc: headerCrc(chunk.name, chunk.dtype, shape) };
      this.tensors[chunk.name] = this.current;
    }
    if (this.current !== null) {
      this.current.parts.push(chunk.data);
      this.current.crc = crc32c(chunk.data, this.current.crc);
      if (isSet(chunk.crc32c)) {
        // The chunk that completes a tensor: its checksum must match what arrived.
        this.count += 1;
        this.bytes += this.current.parts.reduce((n, part) => n + part.length, 0);
        if (chunk.crc32c >>> 0 !== this.current.crc) this.fail(`tensor '${this.current.name}' arrived corrupted (CRC32C mismatch)`);
        else this.verified += 1;
      }
    }
    for (const inner of chunk.packed || []) this.feed(inner);
  }

  fail(message) {
    this.failure = this.failure || Object.assign(new Error(`DATA_LOSS: ${message}`), { details: message });
  }

  finish() {
    const { declared } = this;
    if (declared !== null && (this.count !== declared.count || this.bytes !== declared.bytes)) {
      this.fail(`the stream declared ${declared.count} tensor(s) and ${declared.bytes} bytes but carried ${this.count} and ${this.bytes}`);
    }
    if (this.failure !== null) throw this.failure;
    const out = {};
    for (const [name, t] of Object.entries(this.tensors)) out[name] = { dtype: t.dtype, shape: t.shape, data: Buffer.concat(t.parts) };
    return out;
  }
}

// The examples' checks: each prints one line, ok or FAIL, and counts the failures.
let failures = 0;

function expectEqual(label, actual, expected) {
  report(label, JSON.stringify(actual) === JSON.stringify(expected), actual, expected);
}

// Within `tol` of each expected value, relative to it; relative to at least `floor` (1: absolute below 1).
function expectClose(label, actual, expected, tol, floor = 0) {
  const ok = actual.length === expected.length && actual.every((a, i) => Math.abs(a - expected[i]) <= tol * Math.max(floor, Math.abs(expected[i])));
  report(label, ok, actual, expected);
}

function report(label, ok, actual, expected) {
  console.log(`${ok ? "ok  " : "FAIL"} ${label}: ${JSON.stringify(actual)} vs ${JSON.stringify(expected)}`);
  if (!ok) failures += 1;
}

// Run an example's main(address) against the address on the command line (or WEIGHTAVG_ADDRESS):
// exit 1 when a check failed, 2 when a call failed.
function run(main) {
  const address = process.argv[2] || process.env.WEIGHTAVG_ADDRESS || "127.0.0.1:50051";
  main(address).then(() => {
    if (failures > 0) {
      console.error(`${failures} check(s) failed`);
      process.exitCode = 1;
    } else {
      console.log("all checks passed");
    }
  }, (err) => {
    // A gRPC error carries the status code (err.code, a grpc.status number) and the server's message.
    const code = err.code === undefined ? "" : ` (${grpc.status[err.code]})`;
    console.error(`call failed${code}: ${err.details || err.message}`);
    process.exitCode = 2;
  });
}

module.exports = { grpc, weightavg, DTYPE_CODES, crc32c, headerCrc, tensorChunks, StreamReader, expectEqual, expectClose, run };
