// A generation bundle (manifest kind "generator": a decoder LM with its KV cache) in Node.js: onnxruntime-node and
// the pure-JS tokenizer, greedy, as toolchain/runtime.py's Generator. The prompt is built here from the template and
// the chat turn stored in the bundle's generation.json; the answer ends at the end of turn, a stop string or
// max_new_tokens; its label is the label word that comes first in it.
//
//   import { loadGenerator } from "./generator.mjs";
//   const gen = await loadGenerator("runs/sst2-smollm/bundle", { threads: 2 });
//   (await gen.classify("a gorgeous, witty film")).label;           // "positive"
//   for await (const piece of gen.stream(gen.prompt("a tired mess"))) process.stdout.write(piece);
//
// Both graphs run: the toolchain's fused one (GroupQueryAttention: seqlens_k and total_sequence_length, no mask) and
// optimum's (attention_mask, position_ids). Each run gets the previous run's present key/values as its past; the
// prompt beginning all prompts share (generation.json prefix_ids) runs once, as in the Python runtime.

import path from "node:path";

import { Tokenizer } from "@huggingface/tokenizers";
import ort from "onnxruntime-node";

import { BundleError, readJson, readManifest, sessionOptions, verify } from "./bundle.mjs";

export const GENERATOR_MANIFEST_VERSION = 1;

// Python's str.format with one field: {text} replaced, {{ and }} read as literal braces.
export function fillTemplate(template, text) {
  return template.replace(/\{\{|\}\}|\{text\}/g, (m) => (m === "{text}" ? text : m[0]));
}

// The index of the label whose word comes first in an answer (whole words, case ignored), else null.
export function parseLabel(answer, labels) {
  let best = null;
  for (const [i, label] of labels.entries()) {
    const escaped = label.toLowerCase().replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
    const m = new RegExp(`\\b${escaped}\\b`).exec(answer.toLowerCase());
    if (m && (best === null || m.index < best[0])) best = [m.index, i];
  }
  return best === null ? null : best[1];
}

export async function loadGenerator(dir, { threads, verifyHashes = true } = {}) {
  const manifest = await readManifest(dir, "generator", GENERATOR_MANIFEST_VERSION);
  if (verifyHashes) await verify(dir, manifest);
  const settings = await readJson(path.join(dir, manifest.generation));
  const config = await readJson(path.join(dir, "tokenizer_config.json")).catch(() => {
    throw new BundleError(`${dir}: no tokenizer_config.json; rebuild the bundle (llm-bundle version 4 or later)`);
  });
  const tokenizer = new Tokenizer(await readJson(path.join(dir, manifest.tokenizer)), config);
  const session = await ort.InferenceSession.create(path.join(dir, manifest.model), sessionOptions(manifest, threads));
  const pastNames = session.inputNames.filter((n) => n.startsWith("past_key_values."));
  const spec = Object.fromEntries(manifest.inputs.map((i) => [i.name, i]));
  const [kvHeads, headDim] = [spec[pastNames[0]].shape[1], spec[pastNames[0]].shape[3]];
  const fused = session.inputNames.includes("seqlens_k");
  const eos = new Set(settings.stop_token_ids);

  const prompt = (text) => settings.prompt_prefix + fillTemplate(settings.template, text) + settings.prompt_suffix;
  const encode = (text) => tokenizer.encode(text, { add_special_tokens: false }).ids;
  const decode = (ids) => (ids.length ? tokenizer.decode(ids, { skip_special_tokens: true }) : "");
  const stopped = (ids, stopStrings) => stopStrings.some((s) => decode(ids).includes(s));
  function answerText(ids, stopStrings) {
    let text = decode(ids.filter((i) => !eos.has(i)));
    for (const s of stopStrings) text = text.split(s, 1)[0];
    return text;
  }

  const emptyPast = () =>
    Object.fromEntries(pastNames.map((n) => [n, new ort.Tensor("float32", new Float32Array(0), [1, kvHeads, 0, headDim])]));
  const presents = (result) =>
    Object.fromEntries(pastNames.map((n) => [n, result[n.replace("past_key_values.", "present.")]]));

  // token ids fed to the graph so far, over all runs (the shared prefix counts once): what the prefix saves
  const work = { tokensRun: 0 };

  // one run: `feed` ids after `total - feed.length` cached positions
  function run(feed, past, total) {
    work.tokensRun += feed.length;
    const feeds = { input_ids: new ort.Tensor("int64", BigInt64Array.from(feed, BigInt), [1, feed.length]), ...past };
    if (fused) {
      feeds.seqlens_k = new ort.Tensor("int32", Int32Array.from([total - 1]), [1]);
      feeds.total_sequence_length = new ort.Tensor("int32", Int32Array.from([total]), []);
    } else {
      feeds.attention_mask = new ort.Tensor("int64", new BigInt64Array(total).fill(1n), [1, total]);
      if (session.inputNames.includes("position_ids")) {
        const positions = feed.map((_, i) => BigInt(total - feed.length + i));
        feeds.position_ids = new ort.Tensor("int64", BigInt64Array.from(positions), [1, feed.length]);
      }
    }
    return session.run(feeds);
  }

  // The prompt beginning every prompt shares (generation.json prefix_ids): its key/values computed once, and a
  // prompt that starts with it and goes on runs only its own tokens, as the Python runtime does. Same chunks, same
  // numbers: onnxruntime's 4-bit MatMul gives a row slightly different results depending on how many rows share
  // the run, enough to flip a close greedy choice.
  const prefixIds = settings.prefix_ids ?? [];
  let prefixPast = null;
  const hasPrefix = (ids) =>
    prefixIds.length > 0 && ids.length > prefixIds.length && prefixIds.every((t, i) => ids[i] === t);

  // greedy token ids after `promptIds`, each yielded when decoded
  async function* streamIds(promptIds, { maxNewTokens, stopStrings = [], ignoreEos = false }) {
    if (!promptIds.length) throw new BundleError("the prompt encodes to no tokens");
    let past = emptyPast();
    let feed = promptIds;
    let total = 0;
    if (hasPrefix(promptIds)) {
      prefixPast ??= presents(await run(prefixIds, emptyPast(), prefixIds.length));
      [past, feed, total] = [prefixPast, promptIds.slice(prefixIds.length), prefixIds.length];
    }
    const out = [];
    while (true) {
      total += feed.length;
      const result = await run(feed, past, total);
      const logits = result.logits.data;
      const vocab = result.logits.dims.at(-1);
      let token = 0;
      for (let i = 1, base = logits.length - vocab; i < vocab; i += 1) {
        if (logits[base + i] > logits[base + token]) token = i;
      }
      out.push(token);
      yield token;
      if ((!ignoreEos && eos.has(token)) || stopped(out, stopStrings) || out.length >= maxNewTokens) return;
      past = presents(result);
      feed = [token];
    }
  }

  const options = (o = {}) => ({
    maxNewTokens: o.maxNewTokens ?? settings.max_new_tokens,
    stopStrings: o.stopStrings ?? settings.stop_strings,
    ignoreEos: o.ignoreEos ?? false,
  });

  // {text, ids}: the answer (end of turn removed, cut at the first stop string) and every generated id
  async function generate(promptText, o) {
    const opts = options(o);
    const ids = [];
    for await (const id of streamIds(encode(promptText), opts)) ids.push(id);
    return { text: answerText(ids, opts.stopStrings), ids };
  }

  // the answer's text in pieces as tokens are decoded (a piece waits for the rest of a character split over tokens)
  async function* stream(promptText, o) {
    const opts = options(o);
    const ids = [];
    let sent = "";
    for await (const id of streamIds(encode(promptText), opts)) {
      ids.push(id);
      const text = answerText(ids, opts.stopStrings);
      if (text.length > sent.length && !text.endsWith("\ufffd")) {
        yield text.slice(sent.length);
        sent = text;
      }
    }
    const text = answerText(ids, opts.stopStrings);
    if (text.length > sent.length) yield text.slice(sent.length);
  }

  async function classify(text) {
    const answer = await generate(prompt(text));
    const k = parseLabel(answer.text, settings.labels);
    return { label: k === null ? null : settings.labels[k], ...answer };
  }

  return { manifest, settings, labels: settings.labels, prompt, encode, generate, stream, classify, work };
}
