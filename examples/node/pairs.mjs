#!/usr/bin/env node
// Score or classify text pairs with a cross-encoder bundle from Node.js (onnxruntime-node, no Python):
//
//   make node-example
//   printf 'A man plays a guitar.\tSomeone plays guitar.\n' | node examples/node/pairs.mjs runs/stsb-minilm-cross/bundle
//
// Reads one pair per line (text TAB text_pair); prints one JSON value per pair: the score (regression) or
// {label, score, scores} (classification). Exit status 2 when the bundle is refused.

import { createInterface } from "node:readline";

import { BundleError, loadCrossEncoder } from "./bundle.mjs";

const args = process.argv.slice(2);
let dir = null;
let threads;
for (let i = 0; i < args.length; i += 1) {
  if (args[i] === "--threads") threads = Number(args[(i += 1)]);
  else if (args[i].startsWith("-") || dir !== null) {
    console.error("usage: node pairs.mjs <bundle> [--threads N] < text<TAB>text_pair lines");
    process.exit(1);
  } else dir = args[i];
}

let encoder;
try {
  encoder = await loadCrossEncoder(dir, { threads });
} catch (e) {
  if (!(e instanceof BundleError)) throw e;
  console.error(`error: ${e.message}`);
  process.exit(2);
}

const regression = encoder.manifest.objective === "regression";
const out = [];
for await (const line of createInterface({ input: process.stdin, crlfDelay: Infinity })) {
  if (!line.trim()) continue;
  const [a, b = ""] = line.split("\t");
  out.push(JSON.stringify(regression ? await encoder.score(a, b) : await encoder.predict(a, b)));
  if (out.length >= 256) process.stdout.write(out.splice(0).join("\n") + "\n");
}
if (out.length) process.stdout.write(out.join("\n") + "\n");
