#!/usr/bin/env node
// The reference's avgparms walk-through from Node, against a running weightavg server.
//
//   node avgparms.js [HOST:PORT]        (default 127.0.0.1:50051, or $WEIGHTAVG_ADDRESS)
//
// It loads proto/weightavg/v1/weightavg.proto at run time with @grpc/proto-loader (no generated
// code), builds a linear(2,1) module, sets its parameters, copies them, averages them in twelve
// times and checks the running average against the reference's figures. Exit status 0 when every
// figure matches, 1 on a mismatch, 2 when a call fails.
"use strict";

// The .proto loaded with @grpc/proto-loader, CRC32C and the stream reader: wire.js.
const { grpc, weightavg, crc32c, headerCrc, StreamReader, expectEqual, expectClose, run } = require("./wire");

// Bytes on the wire are little-endian, row-major; float32 is 4 bytes per element.
function float32Bytes(values) {
  const buf = Buffer.alloc(values.length * 4);
  values.forEach((v, i) => buf.writeFloatLE(v, i * 4));
  return buf;
}

function decode(dtype, data) {
  if (dtype === "DTYPE_FLOAT32") {
    return Array.from({ length: data.length / 4 }, (_, i) => data.readFloatLE(i * 4));
  }
  if (dtype === "DTYPE_FLOAT64") {
    return Array.from({ length: data.length / 8 }, (_, i) => data.readDoubleLE(i * 8));
  }
  throw new Error(`this example decodes float32 and float64 only, got ${dtype}`);
}

// Promise wrappers: unary calls and the two streaming shapes this walk-through needs.
function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + 30_000 }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

// SetParameter is client-streaming: the first message names the module and parameter and carries
// the tensor's header chunk (dtype, shape; it may carry data too); further chunks carry more data.
// The stream declares itself (one tensor, its byte count) and the chunk that completes the tensor
// carries its CRC32C, so the server can refuse a stream cut short or corrupted on the way.
function setParameter(client, handle, name, shape, values) {
  return new Promise((resolve, reject) => {
    const call = client.SetParameter({ deadline: Date.now() + 30_000 }, (err, reply) =>
      err ? reject(err) : resolve(reply),
    );
    const data = float32Bytes(values);
    const crc = crc32c(data, headerCrc("", "DTYPE_FLOAT32", shape));
    call.write({
      handle,
      name,
      chunk: { dtype: "DTYPE_FLOAT32", shape, data, tensorCount: 1, totalBytes: data.length, crc32c: crc },
    });
    call.end();
  });
}

// Tensors whose checksum matched, over every fetch.
let verified = 0;

// FetchTensors is server-streaming: a chunk with a dtype starts a named tensor, chunks without one
// (DTYPE_UNSPECIFIED) append bytes to it. The first chunk declares how many tensors and bytes the
// stream carries, and the chunk that completes each tensor its CRC32C: both are checked here
// (StreamReader), and a mismatch rejects with a DATA_LOSS error. Returns {name: {dtype, shape, values}}.
// maxChunkBytes: the most tensor bytes a reply message may carry, for a reader with a small receive
// limit (0: the server's own chunk size; at least 1024). The largest chunk seen is returned as
// `largestChunk` beside the tensors.
function fetchTensors(client, handle, names = [], maxChunkBytes = 0) {
  return new Promise((resolve, reject) => {
    const reader = new StreamReader();
    const call = client.FetchTensors({ handle, names, maxChunkBytes }, { deadline: Date.now() + 30_000 });
    call.on("data", ({ chunk }) => reader.feed(chunk));
    call.on("error", reject);
    call.on("end", () => {
      let tensors;
      try {
        tensors = reader.finish();
      } catch (err) {
        reject(err);
        return;
      }
      verified += reader.verified;
      const out = {};
      for (const [name, t] of Object.entries(tensors)) {
        out[name] = { dtype: t.dtype, shape: t.shape, values: decode(t.dtype, t.data) };
      }
      Object.defineProperty(out, "largestChunk", { value: reader.largestChunk, enumerable: false });
      resolve(out);
    });
  });
}

// The reference prints float32 values to 7 significant digits; checks allow that much relative error.
async function main(address) {
  // The server streams tensors in chunks of up to 4 MiB plus a small header, just over grpc-js's
  // default 4 MiB receive limit; allow the server's own cap (64 MiB) both ways, as the Python client does.
  const client = new weightavg.WeightAveragingService(address, grpc.credentials.createInsecure(), {
    "grpc.max_receive_message_length": 64 << 20,
    "grpc.max_send_message_length": 64 << 20,
  });
  try {
    // m: module(["linear", 2, 1]) -- positional options travel as OptionValue messages.
    const { module: m } = await unary(client, "CreateModule", {
      spec: { type: "linear", args: [{ intValue: 2 }, { intValue: 1 }] },
    });
    expectEqual("module kind", m.kind, "HANDLE_KIND_MODULE");

    await setParameter(client, m.id, "weight", [1, 2], [-0.4876026, -0.3645594]);
    await setParameter(client, m.id, "bias", [1], [-0.1412306]);

    // p: copyparms(m)
    const { dictionary: p } = await unary(client, "CopyParameters", { handle: m.id });
    let values = await fetchTensors(client, p.id);
    expectEqual("copy names", Object.keys(values), ["weight", "bias"]);
    expectClose("copied weight", values.weight.values, [-0.4876026, -0.3645594], 1e-7);

    // parm(m, "weight", 10): a 0-dim tensor (empty shape) broadcasts over the parameter.
    await setParameter(client, m.id, "weight", [], [10]);

    // avgparms(m, p) -> 2
    const { count } = await unary(client, "AverageParameters", { handle: m.id, dictionary: p.id });
    expectEqual("count after the first avgparms", count, 2);
    values = await fetchTensors(client, p.id);
    expectEqual("names with the count", Object.keys(values), ["weight", "bias", ".n"]);
    expectClose("weight average of 2", values.weight.values, [4.756198, 4.81772], 2e-7);
    expectClose("bias average of 2", values.bias.values, [-0.1412306], 2e-7);
    expectEqual(".n dtype", values[".n"].dtype, "DTYPE_FLOAT64");
    expectEqual(".n", values[".n"].values, [2]);

    // Ten more -> 12
    let last = 0;
    for (let i = 0; i < 10; i += 1) {
      last = (await unary(client, "AverageParameters", { handle: m.id, dictionary: p.id })).count;
    }
    expectEqual("count after ten more", last, 12);
    values = await fetchTensors(client, p.id, ["weight", ".n"]);
    expectClose("weight average of 12", values.weight.values, [9.126033, 9.136288], 5e-7);
    expectEqual(".n after ten more", values[".n"].values, [12]);

    // A reader with a small receive limit: max_chunk_bytes cuts a 4000-byte weight into messages of
    // at most 1024 tensor bytes, and the pieces join to the same values; below 1024 is refused.
    const { module: wide } = await unary(client, "CreateModule", {
      spec: { type: "linear", args: [{ intValue: 1000 }, { intValue: 1 }] },
    });
    const ramp = Array.from({ length: 1000 }, (_, i) => i / 8);
    await setParameter(client, wide.id, "weight", [1, 1000], ramp);
    const small = await fetchTensors(client, wide.id, ["weight"], 1024);
    expectEqual("largest chunk under max_chunk_bytes 1024", small.largestChunk <= 1024 && small.largestChunk > 0, true);
    expectEqual("weight fetched in 1 KiB pieces equals what was set", JSON.stringify(small.weight.values) === JSON.stringify(ramp), true);
    const refused = await fetchTensors(client, wide.id, ["weight"], 1000).then(() => null, (err) => err);
    expectEqual("max_chunk_bytes 1000 refused", refused && grpc.status[refused.code], "INVALID_ARGUMENT");

    expectEqual("every fetched tensor carried a matching CRC32C", verified, 8);

    await unary(client, "FreeHandles", { handles: [m.id, p.id, wide.id] });
  } finally {
    client.close();
  }
}

run(main);
