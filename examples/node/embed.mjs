#!/usr/bin/env node
// Embed lines of text with a sentence-embedding bundle from Node.js (onnxruntime-node, no Python):
//
//   make node-example
//   echo "A man is playing a guitar." | node examples/node/embed.mjs runs/stsb-minilm/bundle
//
// Prints one JSON array (the unit-length embedding) per input line. Exit status 2 when the bundle is refused.

import { createInterface } from "node:readline";

import { BundleError, loadEmbedder } from "./bundle.mjs";

const args = process.argv.slice(2);
let dir = null;
let threads;
for (let i = 0; i < args.length; i += 1) {
  if (args[i] === "--threads") threads = Number(args[(i += 1)]);
  else if (args[i].startsWith("-") || dir !== null) {
    console.error("usage: node embed.mjs <bundle> [--threads N] < lines");
    process.exit(1);
  } else dir = args[i];
}

let embedder;
try {
  embedder = await loadEmbedder(dir, { threads });
} catch (e) {
  if (!(e instanceof BundleError)) throw e;
  console.error(`error: ${e.message}`);
  process.exit(2);
}

const out = [];
for await (const line of createInterface({ input: process.stdin, crlfDelay: Infinity })) {
  if (!line.trim()) continue;
  out.push(JSON.stringify(Array.from(await embedder.embed(line))));
  if (out.length >= 256) process.stdout.write(out.splice(0).join("\n") + "\n");
}
if (out.length) process.stdout.write(out.join("\n") + "\n");
