#!/usr/bin/env node
// Find entities in lines of text with a token-classification bundle from Node.js (onnxruntime-node, no Python):
//
//   make node-example
//   echo "Heading to the Empire State Building" | node examples/node/tag.mjs runs/wnut17-minilm/bundle
//
// Prints one JSON array of entities ({type, start, end, text, score}; offsets in code points) per input line.
// Exit status 2 when the bundle is refused.

import { createInterface } from "node:readline";

import { BundleError, loadTagger } from "./bundle.mjs";

const args = process.argv.slice(2);
let dir = null;
let threads;
for (let i = 0; i < args.length; i += 1) {
  if (args[i] === "--threads") threads = Number(args[(i += 1)]);
  else if (args[i].startsWith("-") || dir !== null) {
    console.error("usage: node tag.mjs <bundle> [--threads N] < lines");
    process.exit(1);
  } else dir = args[i];
}

let tagger;
try {
  tagger = await loadTagger(dir, { threads });
} catch (e) {
  if (!(e instanceof BundleError)) throw e;
  console.error(`error: ${e.message}`);
  process.exit(2);
}

const out = [];
for await (const line of createInterface({ input: process.stdin, crlfDelay: Infinity })) {
  if (!line.trim()) continue;
  out.push(JSON.stringify(await tagger.tag(line)));
  if (out.length >= 256) process.stdout.write(out.splice(0).join("\n") + "\n");
}
if (out.length) process.stdout.write(out.join("\n") + "\n");
