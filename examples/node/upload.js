#!/usr/bin/env node
// A dictionary uploaded from Node as a declared, checksummed stream, read back, averaged into an
// exponential moving average with a warm-up schedule, and models merged (weights by layer, TIES),
// against a running weightavg server.
//
//   node upload.js [HOST:PORT]          (default 127.0.0.1:50051, or $WEIGHTAVG_ADDRESS;
//                                        $WEIGHTAVG_TOKEN, when set, goes as 'authorization: Bearer')
//
// Everything here follows docs/clients.md and the .proto's comments only: the bytes of each dtype,
// the declaration (tensorCount, totalBytes) and CRC32C of a stream, packed chunks, request IDs for a
// retry, the moving-average schedule. Exit status 0 when every check passes, 1 on a mismatch, 2 when
// a call fails.
"use strict";

const crypto = require("node:crypto");
const { grpc, weightavg, crc32c, headerCrc, tensorChunks, StreamReader, expectEqual, expectClose, run } = require("./wire");

const DEADLINE_MS = 30_000;

function metadata() {
  const md = new grpc.Metadata();
  if (process.env.WEIGHTAVG_TOKEN) md.set("authorization", `Bearer ${process.env.WEIGHTAVG_TOKEN}`);
  return md;
}

function unary(client, method, request, md = metadata()) {
  return new Promise((resolve, reject) => {
    client[method](request, md, { deadline: Date.now() + DEADLINE_MS }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

// A client stream: every message written, then the half-close (end()) that lets the server answer.
function upload(client, method, messages) {
  return new Promise((resolve, reject) => {
    const call = client[method](metadata(), { deadline: Date.now() + DEADLINE_MS }, (err, reply) => (err ? reject(err) : resolve(reply)));
    for (const message of messages) call.write(message);
    call.end();
  });
}

// FetchTensors, asking for packed chunks (several small tensors a message), checked as it is read.
function fetchTensors(client, handle) {
  return new Promise((resolve, reject) => {
    const reader = new StreamReader();
    const call = client.FetchTensors({ handle, packedChunks: true }, metadata(), { deadline: Date.now() + DEADLINE_MS });
    let messages = 0;
    call.on("data", ({ chunk }) => {
      messages += 1;
      reader.feed(chunk);
    });
    call.on("error", reject);
    call.on("end", () => {
      try {
        resolve({ tensors: reader.finish(), messages, verified: reader.verified });
      } catch (err) {
        reject(err);
      }
    });
  });
}

// TIES-merging of models.a and models.b against models.base, layer by layer (docs/merging.md, "ties"):
// each delta keeps its max(1, floor(density n)) largest magnitudes (ties at the threshold all kept),
// each element's sign is that of sum w_i delta_i (+ at 0), and the contributions w_i delta_i of that
// sign are summed and divided by the weights that counted there (1 where none did).
function tiesMerge({ base, a, b }, weights, density) {
  return base.map((baseLayer, layer) => {
    const deltas = [a[layer], b[layer]].map((model) => {
      const delta = model.map((v, j) => v - baseLayer[j]);
      const k = Math.max(1, Math.floor(density * delta.length));
      const threshold = delta.map(Math.abs).sort((x, y) => y - x)[k - 1];
      return delta.map((d) => (Math.abs(d) >= threshold ? d : 0));
    });
    return baseLayer.map((v, j) => {
      const terms = deltas.map((delta, i) => weights[i] * delta[j]);
      const sign = terms.reduce((sum, t) => sum + t, 0) >= 0 ? 1 : -1;
      const counted = terms.map((t, i) => (t * sign > 0 ? i : -1)).filter((i) => i >= 0);
      const divisor = counted.reduce((sum, i) => sum + weights[i], 0) || 1;
      return v + counted.reduce((sum, i) => sum + terms[i], 0) / divisor;
    });
  });
}

const failed = (promise) => promise.then(() => "OK", (err) => grpc.status[err.code]);

// Little-endian element bytes: float32, int64, bfloat16 (the top 16 bits of a float32).
function float32Bytes(values) {
  const buf = Buffer.alloc(values.length * 4);
  values.forEach((v, i) => buf.writeFloatLE(v, i * 4));
  return buf;
}
const float32Values = (buf) => Array.from({ length: buf.length / 4 }, (_, i) => buf.readFloatLE(i * 4));
function bfloat16Bytes(values) {
  const buf = Buffer.alloc(values.length * 2);
  values.forEach((v, i) => buf.writeUInt16LE(float32Bytes([v]).readUInt16LE(2), i * 2));
  return buf;
}
function int64Bytes(values) {
  const buf = Buffer.alloc(values.length * 8);
  values.forEach((v, i) => buf.writeBigInt64LE(BigInt(v), i * 8));
  return buf;
}

// timm ModelEmaV3's decay at `step` (MovingAverageState in the .proto).
function emaDecay(s, { decay, warmup, warmupGamma, warmupPower, minDecay, updateAfterStep }) {
  const k = s - updateAfterStep - 1;
  if (k <= 0) return 0;
  if (!warmup) return decay;
  return Math.max(minDecay, Math.min(decay, 1 - (1 + k / warmupGamma) ** -warmupPower));
}

async function main(address) {
  const client = new weightavg.WeightAveragingService(address, grpc.credentials.createInsecure(), {
    "grpc.max_receive_message_length": 64 << 20,
    "grpc.max_send_message_length": 64 << 20,
  });
  const made = [];
  try {
    // The docs' worked bytes: float32 10.0 as a lone 0-dim tensor has the CRC32C 0xBF9A3367.
    expectEqual("worked-bytes checksum", crc32c(float32Bytes([10]), headerCrc("", "DTYPE_FLOAT32", [])), 0xbf9a3367);
    expectEqual("CRC32C check value of '123456789'", crc32c(Buffer.from("123456789")), 0xe3069283);

    // One dictionary of several dtypes: a float32 matrix, bfloat16, a 0-dim int64 (one element), an
    // empty tensor (no bytes: its header completes it and carries its crc32c), bool, a UTF-8 name,
    // float16 (1.0 and -2.0) under a long name.
    const sent = [
      { name: "layer.weight", dtype: "DTYPE_FLOAT32", shape: [2, 3], data: float32Bytes([0.5, -1, 2, 3.25, -4, 5]) },
      { name: "layer.bias", dtype: "DTYPE_BFLOAT16", shape: [3], data: bfloat16Bytes([1, -2, 0.5]) },
      { name: "steps", dtype: "DTYPE_INT64", shape: [], data: int64Bytes([-7]) },
      { name: "empty", dtype: "DTYPE_FLOAT32", shape: [0, 4], data: Buffer.alloc(0) },
      { name: "maske\u0301", dtype: "DTYPE_BOOL", shape: [3], data: Buffer.from([1, 0, 1]) },
      // A name over 512 bytes: its header goes without data (wire.js), the data in the next chunks.
      { name: `${"long.".repeat(110)}weight`, dtype: "DTYPE_FLOAT16", shape: [2], data: Buffer.from([0x00, 0x3c, 0x00, 0xc0]) },
    ];
    // Chunks of 5 bytes: cut inside elements, as any byte boundary may be. The request_id goes on the
    // first message; a retry sends the same tensors with the same ID.
    const requestId = crypto.randomUUID();
    const messages = tensorChunks(sent, 5).map((chunk, i) => (i === 0 ? { chunk, requestId } : { chunk }));
    const { dictionary } = await upload(client, "CreateDictionary", messages);
    made.push(dictionary.id);
    expectEqual("uploaded dictionary kind", dictionary.kind, "HANDLE_KIND_DICTIONARY");

    // The retry, cut otherwise (whole tensors) and packed into one message: the same request, so the
    // same answer and no second dictionary (the ID names the tensors, not their chunks or messages).
    const [first, ...rest] = tensorChunks(sent, 1 << 20);
    const retried = await upload(client, "CreateDictionary", [{ chunk: { ...first, packed: rest }, requestId }]);
    expectEqual("a retry with the same request_id gets the first answer", retried.dictionary.id, dictionary.id);

    const fetched = await fetchTensors(client, dictionary.id);
    const short = (name) => (name.length > 24 ? `${name.slice(0, 10)}...${name.slice(-6)}` : name);
    expectEqual("names fetched, in order", Object.keys(fetched.tensors).map(short), sent.map((t) => short(t.name)));
    expectEqual(
      "every tensor back bit for bit, with its dtype and shape",
      sent.every((t) => {
        const back = fetched.tensors[t.name];
        return back.dtype === t.dtype && JSON.stringify(back.shape) === JSON.stringify(t.shape) && back.data.equals(t.data);
      }),
      true,
    );
    expectEqual("packed reply: messages for 6 tensors", fetched.messages, 1);
    expectEqual("every fetched tensor carried a matching CRC32C", fetched.verified, 6);

    // A byte changed on the way (the checksum is the original's): DATA_LOSS, and nothing created.
    const before = (await unary(client, "ListHandles", {})).handles.length;
    const corrupt = tensorChunks(sent.slice(0, 1), 1 << 20);
    corrupt[0].data = Buffer.from(corrupt[0].data);
    corrupt[0].data[3] ^= 0x01;
    expectEqual("a corrupted tensor", await failed(upload(client, "CreateDictionary", corrupt.map((chunk) => ({ chunk })))), "DATA_LOSS");
    // A stream that declares two tensors and carries one (cut short): INVALID_ARGUMENT.
    const cut = tensorChunks(sent.slice(0, 2), 1 << 20).slice(0, 1);
    expectEqual("a stream cut short", await failed(upload(client, "CreateDictionary", cut.map((chunk) => ({ chunk })))), "INVALID_ARGUMENT");
    // The declaration belongs on the first chunk only: a later chunk that sets it, even to 0, is refused.
    const redeclared = tensorChunks(sent.slice(0, 1), 8).map((chunk, i) => (i === 1 ? { ...chunk, tensorCount: 0, totalBytes: 0 } : chunk));
    expectEqual("tensorCount set on a later chunk", await failed(upload(client, "CreateDictionary", redeclared.map((chunk) => ({ chunk })))), "INVALID_ARGUMENT");
    expectEqual("the refused uploads created nothing", (await unary(client, "ListHandles", {})).handles.length, before);

    // A stream of no tensor is its declaring chunk alone: an empty dictionary.
    const { dictionary: none } = await upload(client, "CreateDictionary", [{ chunk: tensorChunks([], 0)[0] }]);
    made.push(none.id);
    expectEqual("an empty dictionary's entries", (await unary(client, "GetSize", { handle: none.id })).dictionary.entries, []);

    // An exponential moving average with a warm-up schedule, of a dictionary's values (a handle that is
    // a dictionary folds in its entries by name): e := e + (1 - decay) * (p - e). Before each step p
    // takes new values through UpdateDictionary, whose first message names the dictionary.
    const values = [[1, 2], [3, -1], [0.5, 4]];
    const w = (v) => [{ name: "w", dtype: "DTYPE_FLOAT32", shape: [2], data: float32Bytes(v) }];
    const { dictionary: p } = await upload(client, "CreateDictionary", tensorChunks(w([0, 0]), 1 << 20).map((chunk) => ({ chunk })));
    made.push(p.id);
    const { dictionary: e } = await upload(client, "CreateDictionary", tensorChunks(w([0, 0]), 1 << 20).map((chunk) => ({ chunk })));
    made.push(e.id);
    const schedule = { decay: 0.9, warmup: true, warmupGamma: 1, warmupPower: 0.75, minDecay: 0, updateAfterStep: 0 };
    let ema = [0, 0];
    for (let s = 1; s <= values.length; s += 1) {
      const set = await upload(client, "UpdateDictionary", [{ dictionary: p.id }, ...tensorChunks(w(values[s - 1]), 4).map((chunk) => ({ chunk }))]);
      expectEqual(`step ${s}: entries set`, set.names, ["w"]);
      // The schedule goes with the first update and is kept with the dictionary; later ones send none.
      const request = s === 1 ? { handle: p.id, dictionary: e.id, ...schedule } : { handle: p.id, dictionary: e.id };
      const { step, decay } = await unary(client, "UpdateMovingAverage", request);
      const expected = emaDecay(s, schedule);
      expectClose(`step ${s}: decay`, [decay], [expected], 1e-12, 1);  // absolute below 1
      expectEqual(`step ${s}: step`, step, s);
      ema = ema.map((v, i) => v + (1 - expected) * (values[s - 1][i] - v));
    }
    const averaged = await fetchTensors(client, e.id);
    expectClose("moving average after 3 steps", float32Values(averaged.tensors.w.data), ema, 1e-6, 1);  // float32 steps
    const kept = (await unary(client, "GetSize", { handle: e.id })).dictionary.movingAverage;
    expectEqual("the schedule kept with the dictionary", [kept.decay, kept.warmup, kept.step], [0.9, true, 3]);

    // Merges (docs/merging.md) of a base and two models fine-tuned from it, two layers each, named as
    // a transformer's are: an entry's layer is the first all-digit part of its name.
    const layers = (v) => v.map((values, i) => ({ name: `layers.${i}.w`, dtype: "DTYPE_FLOAT32", shape: [4], data: float32Bytes(values) }));
    const stored = async (values) => {
      const { dictionary: d } = await upload(client, "CreateDictionary", tensorChunks(layers(values), 1 << 20).map((chunk) => ({ chunk })));
      made.push(d.id);
      return d.id;
    };
    const models = {
      base: [[0, 0, 0, 0], [1, 1, 1, 1]],
      a: [[0.5, -0.25, 0.125, 0], [1.25, 0.75, 1, 1.125]],
      b: [[-0.125, -0.5, 0.25, 0.375], [0.75, 1.5, 1.25, 1]],
    };
    const [base, a, b] = await Promise.all([stored(models.base), stored(models.a), stored(models.b)]);
    const mergedValues = async (request) => {
      const { dictionary: m } = await unary(client, "MergeDictionaries", request);
      made.push(m.id);
      const { tensors } = await fetchTensors(client, m.id);
      return Object.values(tensors).map((t) => float32Values(t.data));
    };
    // A weight per model that moves over the layers (mergekit's gradient, LayerValues): a counts fully
    // at the first layer and b at the last, so the merge is a's first layer and b's second.
    const byLayer = await mergedValues({ method: "linear", dictionaries: [a, b], weightGradients: [{ values: [1, 0] }, { values: [0, 1] }] });
    expectEqual("linear with weights by layer: a's first layer, b's second", byLayer, [models.a[0], models.b[1]]);
    // TIES against the base, density .5 and weights 1 and .5, as the formula in docs/merging.md says.
    const density = 0.5;
    const weights = [1, 0.5];
    const tied = await mergedValues({
      method: "ties", dictionaries: [a, b], base, weights,
      options: [{ name: "density", value: { floatValue: density } }],
    });
    expectClose("ties, density .5, weights 1 and .5", tied.flat(), tiesMerge(models, weights, density).flat(), 1e-6, 1);

    const { freed } = await unary(client, "FreeHandles", { handles: made.splice(0) });
    expectEqual("handles freed", freed, 9);
  } finally {
    if (made.length > 0) await unary(client, "FreeHandles", { handles: made }).catch(() => undefined);
    client.close();
  }
}

run(main);
