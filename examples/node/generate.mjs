#!/usr/bin/env node
// Answer each line of text with a generation bundle from Node.js (onnxruntime-node, no Python):
//
//   make node-example
//   echo "a gorgeous, witty, seductive movie" | node examples/node/generate.mjs runs/sst2-smollm/bundle
//
// Each line goes into the bundle's prompt template and chat turn; prints one JSON object per line:
// {"label", "text", "ids"}. --stream writes the answer's text as it is decoded instead. --tokens N --ignore-eos
// decodes exactly N tokens (no stop string, end of turn ignored): the long continuations the checks compare.
// Exit status 2 when the bundle is refused.

import { createInterface } from "node:readline";

import { BundleError } from "./bundle.mjs";
import { loadGenerator } from "./generator.mjs";

const args = process.argv.slice(2);
let dir = null;
let threads;
let tokens;
let ignoreEos = false;
let streaming = false;
for (let i = 0; i < args.length; i += 1) {
  if (args[i] === "--threads") threads = Number(args[(i += 1)]);
  else if (args[i] === "--tokens") tokens = Number(args[(i += 1)]);
  else if (args[i] === "--ignore-eos") ignoreEos = true;
  else if (args[i] === "--stream") streaming = true;
  else if (args[i].startsWith("-") || dir !== null) {
    console.error("usage: node generate.mjs <bundle> [--threads N] [--stream] [--tokens N --ignore-eos] < lines");
    process.exit(1);
  } else dir = args[i];
}

let gen;
try {
  gen = await loadGenerator(dir, { threads });
} catch (e) {
  if (!(e instanceof BundleError)) throw e;
  console.error(`error: ${e.message}`);
  process.exit(2);
}

for await (const line of createInterface({ input: process.stdin, crlfDelay: Infinity })) {
  if (!line.trim()) continue;
  if (streaming) {
    for await (const piece of gen.stream(gen.prompt(line))) process.stdout.write(piece);
    process.stdout.write("\n");
  } else if (tokens) {
    const { ids } = await gen.generate(gen.prompt(line), { maxNewTokens: tokens, stopStrings: [], ignoreEos });
    process.stdout.write(JSON.stringify({ ids }) + "\n");
  } else {
    process.stdout.write(JSON.stringify(await gen.classify(line)) + "\n");
  }
}
