// Chat page for an mlx-persona ONNX export. Everything runs in the browser with transformers.js;
// the model, the runtime and its WebAssembly binaries are all served from this folder (no CDN).
//
// Sampling follows Hugging Face's generate, in its order, through the logits processors of sampling.js.
//
// Query parameters: ?dtype=fp32|q4 (default: web.json's default_dtype), ?device=wasm|webgpu (default: WebGPU
// when the browser has an adapter, else WASM), ?threads=N (WASM threads; default: onnxruntime's choice).
// Test hook: window.__persona = { ready, error, dtype, device, dtypes, send(text, settings), reset(), load(dtype),
// processScores(logits, history, { promptLength, eos, settings }), showReply(element, text) }.

import {
  env,
  AutoTokenizer,
  AutoModelForCausalLM,
  TextStreamer,
  InterruptableStoppingCriteria,
} from "./vendor/transformers/transformers.min.js";
import { builtinOff, checkSettings, generationProcessors, processScores } from "./sampling.js";

export { processScores };

// The export folder is the folder of this page. A model "id" starting with "/" is never taken for a hub
// id, so transformers.js fetches `${MODEL}config.json`, `${MODEL}onnx/model_q4.onnx`, ... as they are.
const MODEL = new URL("./", location.href).pathname;
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = MODEL;
env.useBrowserCache = false; // always the files on disk: a re-export must not be shadowed by a cache
env.backends.onnx.wasm.wasmPaths = new URL("./vendor/ort/", location.href).href;
if (new URLSearchParams(location.search).has("threads")) {
  env.backends.onnx.wasm.numThreads = Number(new URLSearchParams(location.search).get("threads"));
}

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const SETTINGS = ["do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "no_repeat_ngram_size",
                  "min_new_tokens", "max_new_tokens", "seed"];
// Hugging Face's GenerationConfig defaults, for keys generation_config.json leaves out.
const HF_DEFAULTS = { do_sample: false, temperature: 1.0, top_k: 50, top_p: 1.0, min_p: 0, repetition_penalty: 1.0,
                      no_repeat_ngram_size: 0, min_new_tokens: 0, max_new_tokens: 256, seed: null };

const hook = {
  ready: false,
  error: null,
  dtype: null,
  device: null,
  dtypes: [],
  send,
  reset,
  load,
  processScores,
  showReply,
};
window.__persona = hook;

let tokenizer = null;
let model = null;
let messages = [];
let busy = false;
let stopper = null;
let generation = {}; // generation_config.json

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function setBusy(value) {
  busy = value;
  $("send").disabled = value || !hook.ready;
  $("message").disabled = value || !hook.ready;
  $("stop").disabled = !value;
  $("dtype").disabled = value;
}

async function fetchJSON(name, fallback = null) {
  try {
    const r = await fetch(MODEL + name, { cache: "no-store" });
    return r.ok ? await r.json() : fallback;
  } catch {
    return fallback;
  }
}

async function pickDevice() {
  const forced = params.get("device");
  if (forced) return forced;
  try {
    if (navigator.gpu && (await navigator.gpu.requestAdapter())) return "webgpu";
  } catch {
    // no usable adapter
  }
  return "wasm";
}

function defaults(gen) {
  return Object.fromEntries(SETTINGS.map((key) => [key, gen[key] ?? HF_DEFAULTS[key]]));
}

// The persona's name and its generation defaults (generation_config.json), as the panel starts.
function showPersona(manifest, gen) {
  $("persona-name").textContent = manifest.persona?.name ?? "(no persona card found at export)";
  $("preset").textContent = manifest.preset ? `${manifest.preset} preset` : "custom";
  const d = defaults(gen);
  const items = d.do_sample
    ? [["sampling", "on"], ["temperature", d.temperature], ["top-k", d.top_k || "off"], ["top-p", d.top_p],
       ["min-p", d.min_p || "off"]]
    : [["sampling", "off (greedy)"]];
  items.push(["repetition penalty", d.repetition_penalty], ["no-repeat n-gram", d.no_repeat_ngram_size || "off"],
             ["min new tokens", d.min_new_tokens], ["max new tokens", d.max_new_tokens]);
  $("defaults").replaceChildren(...items.flatMap(([k, v]) => {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = k;
    dd.textContent = String(v);
    dd.dataset.key = k;
    return [dt, dd];
  }));
}

// Why this precision loads first (web.json records what the export measured).
function dtypeNote(manifest) {
  const a = manifest.q4_agreement;
  const measured = a == null ? "q4's agreement with fp32 was not measured"
    : `q4 picks fp32's greedy next token at ${(100 * a).toFixed(0)}% of the positions measured at export`;
  const rule = `q4 is the default only from ${(100 * (manifest.q4_min_agreement ?? 0.9)).toFixed(0)}%`;
  return `${measured}; ${rule}. q4 is ~4x smaller and faster to download; fp32 is exact.`;
}

function showSettings(s) {
  for (const key of SETTINGS) {
    if (!(key in s)) continue;
    const el = $(key);
    if (el.type === "checkbox") el.checked = Boolean(s[key]);
    else el.value = s[key] ?? "";
  }
}

function readSettings() {
  const s = {};
  for (const key of SETTINGS) {
    const el = $(key);
    if (el.type === "checkbox") s[key] = el.checked;
    else s[key] = key === "seed" && el.value.trim() === "" ? null : Number(el.value);
  }
  return s;
}

function eosIds() {
  const eos = generation.eos_token_id ?? [];
  return Array.isArray(eos) ? eos : [eos];
}

// transformers.js' generate() options: every setting applied by our chain, in Hugging Face's order.
function generationOptions(s, promptLength) {
  return {
    ...builtinOff,
    max_new_tokens: s.max_new_tokens,
    logits_processor: generationProcessors(s, { promptLength, eos: eosIds() }),
  };
}

// A reply as the bubble shows it: one that is empty or only whitespace says so instead of looking blank.
function showReply(el, text) {
  el.classList.toggle("blank", text.trim() === "");
  if (text === "") el.textContent = "(empty reply)";
  else if (text.trim() === "") {
    const what = /^\n+$/.test(text) ? "line breaks" : "whitespace characters";
    el.textContent = `(only whitespace: ${text.length} ${what})`;
  } else el.textContent = text;
}

function bubble(role, text = "") {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("chat").appendChild(div);
  $("chat").scrollTop = $("chat").scrollHeight;
  return div;
}

async function load(dtype) {
  hook.ready = false;
  hook.error = null;
  setBusy(true);
  $("progress").hidden = false;
  const files = {};
  const progress_callback = (p) => {
    if (p.status === "progress" && p.total) {
      files[p.file] = [p.loaded, p.total];
      const [loaded, total] = Object.values(files).reduce((a, [l, t]) => [a[0] + l, a[1] + t], [0, 0]);
      $("progress").value = (100 * loaded) / total;
    }
  };
  try {
    tokenizer ??= await AutoTokenizer.from_pretrained(MODEL);
    if (model) await model.dispose();
    model = null;
    setStatus(`Loading the ${dtype} model on ${hook.device}…`);
    try {
      model = await AutoModelForCausalLM.from_pretrained(MODEL, { dtype, device: hook.device, progress_callback });
    } catch (e) {
      if (hook.device !== "webgpu") throw e;
      console.warn("WebGPU failed, falling back to WebAssembly:", e);
      hook.device = "wasm";
      $("device").textContent = hook.device;
      model = await AutoModelForCausalLM.from_pretrained(MODEL, { dtype, device: "wasm", progress_callback });
    }
    hook.dtype = dtype;
    hook.ready = true;
    setStatus(`Ready: ${dtype} on ${hook.device}.`);
  } catch (e) {
    hook.error = String(e?.stack ?? e);
    setStatus(`Could not load the model: ${e?.message ?? e}`, true);
    console.error(e);
  } finally {
    $("progress").hidden = true;
    setBusy(false);
  }
}

function reset() {
  messages = [];
  $("chat").replaceChildren();
}

// One chat turn (`settings` are applied to the panel first). Resolves to { text, tokens, prompt_ids, seconds }.
async function send(text, settings = null) {
  if (!hook.ready) throw new Error("the model is not loaded");
  if (busy) throw new Error("a reply is already being generated");
  text = String(text).trim();
  if (!text) throw new Error("empty message");
  if (settings) showSettings(settings); // what the panel shows is what runs
  const s = readSettings();
  checkSettings(s);
  setBusy(true);
  messages.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant");
  out.classList.add("streaming");
  const t0 = performance.now();
  try {
    const system = $("system").value.trim();
    const conversation = system ? [{ role: "system", content: system }, ...messages] : messages;
    const inputs = tokenizer.apply_chat_template(conversation, { add_generation_prompt: true, return_dict: true });
    const promptLength = inputs.input_ids.dims.at(-1);
    stopper = new InterruptableStoppingCriteria();
    const streamer = new TextStreamer(tokenizer, {
      skip_prompt: true,
      skip_special_tokens: true,
      callback_function: (piece) => {
        out.textContent += piece;
        $("chat").scrollTop = $("chat").scrollHeight;
      },
    });
    const sequences = await model.generate({
      ...inputs,
      ...generationOptions(s, promptLength),
      streamer,
      stopping_criteria: stopper,
    });
    const generated = sequences.slice(null, [promptLength, null]);
    const reply = tokenizer.batch_decode(generated, { skip_special_tokens: true })[0];
    showReply(out, reply); // the exact decode (the streamer holds back partial words)
    messages.push({ role: "assistant", content: reply });
    const seconds = (performance.now() - t0) / 1000;
    const tokens = Array.from(generated.data, Number);
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = `${tokens.length} tokens · ${(tokens.length / seconds).toFixed(1)} tok/s · ${hook.dtype} · ${hook.device}`;
    out.appendChild(meta);
    return { text: reply, tokens, prompt_ids: Array.from(inputs.input_ids.data, Number), seconds };
  } catch (e) {
    messages.pop();
    out.textContent = `(error: ${e?.message ?? e})`;
    throw e;
  } finally {
    out.classList.remove("streaming");
    stopper = null;
    setBusy(false);
  }
}

async function main() {
  const manifest = await fetchJSON("web.json", {});
  generation = await fetchJSON("generation_config.json", {});
  hook.dtypes = manifest.dtypes ?? ["q4"];
  if (manifest.title) {
    $("title").textContent = manifest.title;
    document.title = manifest.title;
  }
  showPersona(manifest, generation);
  showSettings(defaults(generation));
  $("dtype-note").textContent = dtypeNote(manifest);
  const select = $("dtype");
  for (const d of hook.dtypes) select.add(new Option(d, d));
  const wanted = params.get("dtype");
  const dtype = hook.dtypes.includes(wanted) ? wanted : manifest.default_dtype ?? hook.dtypes[0];
  select.value = dtype;
  select.addEventListener("change", () => load(select.value));
  hook.device = await pickDevice();
  $("device").textContent = hook.device;

  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("message").value;
    if (!text.trim() || busy) return;
    $("message").value = "";
    send(text).catch((e) => setStatus(`Generation failed: ${e?.message ?? e}`, true));
  });
  $("message").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => stopper?.interrupt());
  $("reset").addEventListener("click", reset);
  $("restore").addEventListener("click", () => showSettings(defaults(generation)));
  await load(dtype);
}

main().catch((e) => {
  hook.error = String(e?.stack ?? e);
  setStatus(`Error: ${e?.message ?? e}`, true);
});
