#!/usr/bin/env node
// Classify lines of text with a bundle from Node.js (onnxruntime-node, no Python):
//
//   make node-example        # ONNXRUNTIME_NODE_INSTALL=skip npm ci --prefix examples/node
//   echo "a gorgeous, witty, seductive movie" | node examples/node/classify.mjs runs/sst2-minilm/bundle
//
// Prints one line per input line: label, score (the label's probability) and the text, tab-separated; with --json,
// one JSON object per line ({label, score, scores, logits}). Exit status 2 when the bundle is refused.

import { createInterface } from "node:readline";

import { BundleError, loadBundle } from "./bundle.mjs";

function usage() {
  console.error("usage: node classify.mjs <bundle> [--json] [--threads N] < lines");
  process.exit(1);
}

const args = process.argv.slice(2);
let dir = null;
let json = false;
let threads;
for (let i = 0; i < args.length; i += 1) {
  if (args[i] === "--json") json = true;
  else if (args[i] === "--threads") threads = Number(args[(i += 1)]);
  else if (args[i].startsWith("-") || dir !== null) usage();
  else dir = args[i];
}
if (dir === null) usage();

let bundle;
try {
  bundle = await loadBundle(dir, { threads });
} catch (e) {
  if (!(e instanceof BundleError)) throw e;
  console.error(`error: ${e.message}`);
  process.exit(2);
}

const out = [];
for await (const line of createInterface({ input: process.stdin, crlfDelay: Infinity })) {
  if (!line.trim()) continue;
  const p = await bundle.predict(line);
  out.push(json ? JSON.stringify(p) : `${p.label}\t${p.score.toFixed(4)}\t${line}`);
  if (out.length >= 256) process.stdout.write(out.splice(0).join("\n") + "\n");
}
if (out.length) process.stdout.write(out.join("\n") + "\n");
