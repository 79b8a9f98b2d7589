// Load a toolchain bundle (runs/<recipe>/bundle) in Node.js and classify texts: onnxruntime-node plus the pure-JS
// tokenizer that reads the bundle's tokenizer.json. Mirrors toolchain/runtime.py: every file's sha256 is checked
// against manifest.json, texts are tokenized and cut at the bundle's max_length exactly like the `tokenizers`
// library does, and each text runs on its own (batch 1, what the bundle's accuracy was measured with).
//
//   import { loadBundle } from "./bundle.mjs";
//   const bundle = await loadBundle("runs/sst2-minilm/bundle");
//   const { label, score } = await bundle.predict("a gorgeous, witty film");  // also scores (per label), logits
//   const embedder = await loadEmbedder("runs/stsb-minilm/bundle");     // a sentence-embedding bundle
//   const vector = await embedder.embed("A man is playing a guitar.");  // Float32Array, unit length

import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import path from "node:path";

import { Tokenizer } from "@huggingface/tokenizers";
import ort from "onnxruntime-node";

export const MANIFEST_VERSION = 2;
export const EMBEDDER_MANIFEST_VERSION = 1;
export const TAGGER_MANIFEST_VERSION = 1;
export const CROSS_ENCODER_MANIFEST_VERSION = 1;

// manifest inputs' `from` (the Python `tokenizers` Encoding field) -> the key this tokenizer's encode() returns it under
const ENCODING_KEY = { ids: "ids", attention_mask: "attention_mask", type_ids: "token_type_ids" };

export class BundleError extends Error {}

export async function readJson(file) {
  return JSON.parse(await readFile(file, "utf8"));
}

export async function verify(dir, manifest) {
  for (const [name, info] of Object.entries(manifest.files)) {
    let bytes;
    try {
      bytes = await readFile(path.join(dir, name));
    } catch {
      throw new BundleError(`${dir}: ${name} is missing`);
    }
    if (createHash("sha256").update(bytes).digest("hex") !== info.sha256) {
      throw new BundleError(
        `${dir}: ${name} does not match its sha256 in manifest.json; the bundle was changed or damaged: rebuild it`,
      );
    }
  }
}

function softmax(logits) {
  const max = Math.max(...logits);
  const e = logits.map((x) => Math.exp(x - max));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((x) => x / sum);
}

// Token ids cut to maxLength with the special tokens kept, as `tokenizers` truncates a single text (longest_first):
// the text's own tokens are cut, then the post-processor's [CLS] ... [SEP] (or the model's equivalents) go around them.
export function encode(tokenizer, text, maxLength) {
  const full = tokenizer.encode(text, { return_token_type_ids: true });
  if (full.ids.length <= maxLength) return full;
  const body = tokenizer.encode(text, { add_special_tokens: false }).ids;
  const specials = full.ids.length - body.length;
  let start = 0;
  while (start <= specials && !body.every((id, i) => full.ids[start + i] === id)) start += 1;
  if (start > specials) throw new BundleError("cannot locate the text's tokens between the special tokens");
  const keep = maxLength - specials;
  const pick = (xs) => [...xs.slice(0, start + keep), ...xs.slice(start + body.length)];
  return { ids: pick(full.ids), attention_mask: pick(full.attention_mask), token_type_ids: pick(full.token_type_ids) };
}

export async function readManifest(dir, kind, version) {
  const manifest = await readJson(path.join(dir, "manifest.json")).catch(() => {
    throw new BundleError(`${dir}: no readable manifest.json; this is not a bundle folder`);
  });
  if ((manifest.kind ?? "classifier") !== kind) {
    const loaders = {
      embedder: "loadEmbedder",
      tagger: "loadTagger",
      "cross-encoder": "loadCrossEncoder",
      generator: "loadGenerator (generator.mjs)",
      classifier: "loadBundle",
    };
    const loader = loaders[manifest.kind ?? "classifier"];
    if (!loader) throw new BundleError(`${dir}: a ${manifest.kind} bundle, which this app does not run`);
    throw new BundleError(`${dir}: a ${manifest.kind ?? "classifier"} bundle: load it with ${loader}`);
  }
  if (manifest.format_version !== version) {
    throw new BundleError(`${dir}: format_version ${manifest.format_version}, this app reads ${version}`);
  }
  return manifest;
}

// onnxruntime's session options as the bundle was measured: sequential, all graph optimizations, `threads` intra-op
// threads, and the manifest's session config entries ("optimization.x": "y" -> extra.optimization.x = "y").
export function sessionOptions(manifest, threads) {
  const options = { executionMode: "sequential", graphOptimizationLevel: "all", interOpNumThreads: 1 };
  if (threads) options.intraOpNumThreads = threads;
  const extra = {};
  for (const [key, value] of Object.entries(manifest.runtime?.cpu_session_config ?? {})) {
    const dot = key.indexOf(".");
    (extra[key.slice(0, dot)] ??= {})[key.slice(dot + 1)] = value;
  }
  if (Object.keys(extra).length) options.extra = extra;
  return options;
}

// The tokenizer, the onnxruntime session (set up as the bundle was measured) and a function text -> the session's
// first output for that one text (batch 1), shared by classifiers and embedders.
async function openModel(dir, manifest, threads, verifyHashes) {
  if (verifyHashes) await verify(dir, manifest);
  const pre = manifest.preprocessing;
  const tokenizer = new Tokenizer(
    await readJson(path.join(dir, pre.tokenizer)),
    await readJson(path.join(dir, "tokenizer_config.json")),
  );
  const session = await ort.InferenceSession.create(path.join(dir, manifest.model), sessionOptions(manifest, threads));

  // what the model takes, and the tokenizer field each comes from: the manifest's inputs
  const sources = Object.fromEntries(manifest.inputs.filter((i) => i.from).map((i) => [i.name, ENCODING_KEY[i.from]]));
  for (const name of session.inputNames) {
    if (!sources[name]) throw new BundleError(`${dir}: the model takes ${name}; manifest.json names no field for it`);
  }

  // one encoding ({ids, attention_mask, token_type_ids}) -> the session's first output, flat
  async function runEncoding(enc) {
    const feeds = {};
    for (const name of session.inputNames) {
      const values = enc[sources[name]];
      feeds[name] = new ort.Tensor("int64", BigInt64Array.from(values, BigInt), [1, values.length]);
    }
    const result = await session.run(feeds);
    return result[session.outputNames[0]].data;
  }
  const run = (text) => runEncoding(encode(tokenizer, text, pre.max_length));
  return Object.assign(run, { runEncoding, tokenizer });
}

export async function loadBundle(dir, { threads, verifyHashes = true } = {}) {
  const manifest = await readManifest(dir, "classifier", MANIFEST_VERSION);
  const run = await openModel(dir, manifest, threads, verifyHashes);
  const labels = manifest.labels;

  async function logits(text) {
    return Array.from(await run(text), Number);
  }

  async function predict(text) {
    const raw = await logits(text);
    const probs = softmax(raw);
    const k = probs.indexOf(Math.max(...probs));
    const scores = Object.fromEntries(labels.map((l, i) => [l, probs[i]]));
    return { label: labels[k], score: probs[k], scores, logits: raw };
  }

  return { manifest, labels, logits, predict };
}

// A sentence-embedding bundle (manifest kind "embedder"): embed(text) -> Float32Array of manifest.dimension values,
// mean-pooled and L2-normalized inside the graph (a dot product of two is their cosine similarity).
export async function loadEmbedder(dir, { threads, verifyHashes = true } = {}) {
  const manifest = await readManifest(dir, "embedder", EMBEDDER_MANIFEST_VERSION);
  const run = await openModel(dir, manifest, threads, verifyHashes);
  async function embed(text) {
    return Float32Array.from(await run(text));
  }
  return { manifest, dimension: manifest.dimension, embed };
}

// The words of a text (runs of non-space characters) with their character offsets, as toolchain/runtime.py's
// split_words: JS string indices count UTF-16 units, so offsets are converted to code points (Python's str indices).
export function splitWords(text) {
  const words = [];
  for (const m of text.matchAll(/\S+/gu)) {
    const start = [...text.slice(0, m.index)].length;
    words.push({ word: m[0], start, end: start + [...m[0]].length });
  }
  return words;
}

// BIO tags -> [type, first word, last word], as toolchain/runtime.py's bio_entities (and seqeval) read them.
export function bioEntities(tags) {
  const found = [];
  let current = null;
  for (const [i, tag] of [...tags, "O"].entries()) {
    const [prefix, kind] = tag !== "O" && tag.length > 2 ? [tag[0], tag.slice(2)] : ["O", ""];
    if (current && (prefix === "O" || prefix === "B" || kind !== current[0])) {
      found.push([current[0], current[1], i - 1]);
      current = null;
    }
    if ((prefix === "B" || prefix === "I") && !current) current = [kind, i];
  }
  return found;
}

// A token-classification bundle (manifest kind "tagger"): tag(text) -> [{type, start, end, text, score}], offsets in
// code points (Python's). Each word is tokenized on its own (the JS tokenizer has no pre-tokenized input): its pieces
// without special tokens, joined between the [CLS]/[SEP] (or the model's) ids an empty text gets, cut at max_length;
// a word's tag is read at its first piece, a word cut off is O. The same ids as Python's is_pretokenized encoding.
export async function loadTagger(dir, { threads, verifyHashes = true } = {}) {
  const manifest = await readManifest(dir, "tagger", TAGGER_MANIFEST_VERSION);
  const run = await openModel(dir, manifest, threads, verifyHashes);
  const tags = manifest.labels;
  const maxLength = manifest.preprocessing.max_length;
  const empty = run.tokenizer.encode("", { return_token_type_ids: true });
  const [head, tail] = [empty.ids.slice(0, 1), empty.ids.slice(1)];

  async function tag(text) {
    const words = splitWords(text);
    if (!words.length) return [];
    const ids = [...head];
    const firsts = [];
    for (const { word } of words) {
      firsts.push(ids.length);
      ids.push(...run.tokenizer.encode(word, { add_special_tokens: false }).ids);
    }
    const body = ids.slice(0, maxLength - tail.length);
    const all = [...body, ...tail];
    const enc = { ids: all, attention_mask: all.map(() => 1), token_type_ids: all.map(() => 0) };
    const logits = await run.runEncoding(enc);
    const width = tags.length;
    const wordTags = [];
    const probs = [];
    for (const f of firsts) {
      if (f >= body.length) {
        wordTags.push("O");
        probs.push(1);
        continue;
      }
      const p = softmax(Array.from(logits.slice(f * width, (f + 1) * width), Number));
      const k = p.indexOf(Math.max(...p));
      wordTags.push(tags[k]);
      probs.push(p[k]);
    }
    const chars = [...text];
    return bioEntities(wordTags).map(([type, a, b]) => {
      const span = probs.slice(a, b + 1);
      const score = span.reduce((x, y) => x + y, 0) / span.length;
      const [start, end] = [words[a].start, words[b].end];
      return { type, start, end, text: chars.slice(start, end).join(""), score };
    });
  }
  return { manifest, tags, tag };
}

// A pair of texts encoded together ([CLS] a [SEP] b [SEP], segment ids 0 then 1), cut at maxLength as `tokenizers`
// cuts a pair (longest_first: the shorter keeps what it can, up to half, the longer gets the rest).
export function encodePair(tokenizer, a, b, maxLength) {
  const full = tokenizer.encode(a, { text_pair: b, return_token_type_ids: true });
  if (full.ids.length <= maxLength) return full;
  const ia = tokenizer.encode(a, { add_special_tokens: false }).ids;
  const ib = tokenizer.encode(b, { add_special_tokens: false }).ids;
  const at = (body, from) => {
    for (let s = from; s + body.length <= full.ids.length; s += 1) {
      if (body.every((id, i) => full.ids[s + i] === id)) return s;
    }
    throw new BundleError("cannot locate the pair's tokens between the special tokens");
  };
  const sa = at(ia, 0);
  const sb = at(ib, sa + ia.length);
  const total = maxLength - (full.ids.length - ia.length - ib.length);
  let [n1, n2] = ia.length > ib.length ? [ib.length, ia.length] : [ia.length, ib.length];
  n2 = n1 > total ? n1 : Math.max(n1, total - n1);
  if (n1 + n2 > total) {
    n1 = Math.floor(total / 2);
    n2 = n1 + (total % 2);
  }
  const [ka, kb] = ia.length > ib.length ? [n2, n1] : [n1, n2];
  const pick = (xs) => [
    ...xs.slice(0, sa + ka),
    ...xs.slice(sa + ia.length, sb + kb),
    ...xs.slice(sb + ib.length),
  ];
  return { ids: pick(full.ids), attention_mask: pick(full.attention_mask), token_type_ids: pick(full.token_type_ids) };
}

// A cross-encoder bundle (manifest kind "cross-encoder"): score(a, b) -> the regressor's score on the gold scale
// (0..score_max); predict(a, b) -> {label, score, scores} for a pair classifier.
export async function loadCrossEncoder(dir, { threads, verifyHashes = true } = {}) {
  const manifest = await readManifest(dir, "cross-encoder", CROSS_ENCODER_MANIFEST_VERSION);
  const run = await openModel(dir, manifest, threads, verifyHashes);
  const logits = async (a, b) =>
    Array.from(await run.runEncoding(encodePair(run.tokenizer, a, b, manifest.preprocessing.max_length)), Number);
  async function score(a, b) {
    if (manifest.objective !== "regression") throw new BundleError(`${dir}: a pair classifier; use predict`);
    return (await logits(a, b))[0] * manifest.score_max;
  }
  async function predict(a, b) {
    if (manifest.objective !== "classification") throw new BundleError(`${dir}: a score regressor; use score`);
    const probs = softmax(await logits(a, b));
    const k = probs.indexOf(Math.max(...probs));
    return { label: manifest.labels[k], score: probs[k], scores: Object.fromEntries(manifest.labels.map((l, i) => [l, probs[i]])) };
  }
  return { manifest, score, predict };
}
