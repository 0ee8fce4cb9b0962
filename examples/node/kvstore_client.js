#!/usr/bin/env node
// A kvrecall kvstore client in Node.js, built from proto/kvrecall/kvstore/v1/kvstore.proto alone.
//
// It shows what an engine in another language does, with no hashing of its own:
//   1. Lookup(model_id, profile_id, chunk_tokens, token_ids)  -> every full chunk's key + cached prefix length
//   2. Put the first missing chunk under the key Lookup gave   (client stream: header, then <= 1 MiB data chunks)
//   3. Lookup again                                            -> the prefix is now cached
//   4. Get it back                                             (server stream: header, then data chunks),
//      checking the size and the CRC-32 of the reassembled object end to end.
//
// Usage:
//   node kvstore_client.js --target 127.0.0.1:50051 --model M --profile P --chunk-tokens 256 \
//        --tokens tokens.json --blob chunk.bin --out fetched.bin [--token TOKEN] [--proto PATH]
// Prints one JSON line: {"keys": [hex...], "cached_before": n, "cached_after": n, "put_tiers": [...], ...}.
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const CHUNK_BYTES = 1 << 20; // data per Put message; must stay below the server's --max-message-bytes - 64 KiB
const MAX_MESSAGE_BYTES = 8 << 20;

// ---------------------------------------------------------------------------------------------- CRC-32
// zlib / ISO-HDLC polynomial (reflected 0xEDB88320), the checksum of ObjectHeader.crc32.
const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

function crc32(buf, crc = 0) {
  crc = ~crc >>> 0;
  for (let i = 0; i < buf.length; i++) crc = CRC_TABLE[(crc ^ buf[i]) & 0xff] ^ (crc >>> 8);
  return ~crc >>> 0;
}

// ---------------------------------------------------------------------------------------------- client
function connect(target, protoPath, token) {
  const def = protoLoader.loadSync(protoPath, {
    keepCase: true, // field names as in the .proto (total_bytes, not totalBytes)
    longs: String, // uint64 as decimal strings: token ids and sizes may exceed 2**53
    defaults: true,
    oneofs: true,
  });
  const pkg = grpc.loadPackageDefinition(def).kvrecall.kvstore.v1;
  const client = new pkg.KVStore(target, grpc.credentials.createInsecure(), {
    "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
    "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
  });
  const metadata = new grpc.Metadata();
  if (token) metadata.set("authorization", `Bearer ${token}`);
  return { client, metadata };
}

function deadline(seconds = 30) {
  return new Date(Date.now() + seconds * 1000);
}

function lookup({ client, metadata }, req) {
  return new Promise((resolve, reject) =>
    client.Lookup(req, metadata, { deadline: deadline() }, (err, resp) => (err ? reject(err) : resolve(resp))),
  );
}

function put({ client, metadata }, key, data) {
  return new Promise((resolve, reject) => {
    const call = client.Put(metadata, { deadline: deadline() }, (err, resp) => (err ? reject(err) : resolve(resp)));
    call.write({ header: { key, total_bytes: String(data.length), crc32: crc32(data), ttl_seconds: 0 } });
    for (let off = 0; off < data.length; off += CHUNK_BYTES) call.write({ data: data.subarray(off, off + CHUNK_BYTES) });
    call.end();
  });
}

function get({ client, metadata }, key) {
  // Resolves to a Buffer, or null when the key is absent (NOT_FOUND). A Get that was announced by Exists or
  // Lookup can still be NOT_FOUND (evicted or expired meanwhile): treat it as a cache miss.
  return new Promise((resolve, reject) => {
    const call = client.Get({ key, chunk_bytes: CHUNK_BYTES }, metadata, { deadline: deadline() });
    let out = null;
    let offset = 0;
    let expected = null;
    let tier = "";
    call.on("data", (msg) => {
      if (msg.header) {
        expected = msg.header;
        tier = msg.tier;
        out = Buffer.allocUnsafe(Number(msg.header.total_bytes));
      }
      if (msg.data && msg.data.length) {
        if (out === null || offset + msg.data.length > out.length) {
          call.cancel();
          reject(new Error("Get sent more bytes than its header announced"));
          return;
        }
        msg.data.copy(out, offset);
        offset += msg.data.length;
      }
    });
    call.on("error", (err) => (err.code === grpc.status.NOT_FOUND ? resolve(null) : reject(err)));
    call.on("end", () => {
      if (out === null) return reject(new Error("Get stream ended without a header"));
      if (offset !== out.length) return reject(new Error(`Get sent ${offset} of ${out.length} bytes`));
      if (crc32(out) !== expected.crc32) return reject(new Error("CRC-32 mismatch on Get"));
      resolve({ data: out, tier });
    });
  });
}

// ---------------------------------------------------------------------------------------------- main
function parseArgs(argv) {
  const args = { chunkTokens: 256, proto: path.join(__dirname, "..", "..", "proto", "kvrecall", "kvstore", "v1", "kvstore.proto") };
  for (let i = 2; i < argv.length; i += 2) {
    const name = argv[i].replace(/^--/, "").replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    args[name] = argv[i + 1];
  }
  for (const need of ["target", "model", "profile", "tokens", "blob", "out"]) {
    if (!args[need]) throw new Error(`missing --${need}`);
  }
  return args;
}

async function main() {
  const args = parseArgs(process.argv);
  const conn = connect(args.target, args.proto, args.token);
  // A JSON array of token ids, read as decimal strings: JSON.parse would round ids above 2**53.
  const text = fs.readFileSync(args.tokens, "utf8");
  if (!/^\s*\[[\d\s,]*\]\s*$/.test(text)) throw new Error(`${args.tokens}: expected a JSON array of token ids`);
  const tokenIds = text.match(/\d+/g) || [];
  const blob = fs.readFileSync(args.blob);
  const req = { model_id: args.model, profile_id: args.profile, chunk_tokens: Number(args.chunkTokens), token_ids: tokenIds };

  const before = await lookup(conn, req);
  if (before.keys.length === 0) throw new Error("no full chunk in the token ids");
  const missing = before.keys[before.cached_chunks]; // first chunk not yet stored
  const stored = missing ? await put(conn, missing, blob) : { tiers: [] };
  const after = await lookup(conn, req);
  const got = await get(conn, before.keys[0]);
  if (got === null) throw new Error("stored chunk not found");
  fs.writeFileSync(args.out, got.data);
  console.log(JSON.stringify({
    keys: before.keys.map((k) => Buffer.from(k).toString("hex")),
    cached_before: before.cached_chunks,
    cached_after: after.cached_chunks,
    cached_tokens_after: Number(after.cached_tokens),
    put_tiers: stored.tiers,
    get_tier: got.tier,
    bytes: got.data.length,
  }));
  conn.client.close();
}

main().catch((err) => {
  console.error(`kvstore_client.js: ${err.message || err}`);
  process.exit(1);
});
