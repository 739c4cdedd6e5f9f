// Chat page for an mlx-persona ONNX export. Everything runs in the browser with transformers.js;
// the model, the runtime and its WebAssembly binaries are all served from this folder (no CDN).
//
// Query parameters: ?dtype=fp32|q4 (default: web.json's default), ?device=wasm|webgpu (default: WebGPU
// when the browser has an adapter, else WASM), ?threads=N (WASM threads; default: onnxruntime's choice).
// Test hook: window.__persona = { ready, error, dtype, device, dtypes, send(text, settings), reset(), load(dtype) }.

import {
  env,
  AutoTokenizer,
  AutoModelForCausalLM,
  TextStreamer,
  InterruptableStoppingCriteria,
} from "./vendor/transformers/transformers.min.js";

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
const SETTINGS = ["do_sample", "temperature", "top_k", "repetition_penalty", "min_new_tokens", "max_new_tokens"];

const hook = {
  ready: false,
  error: null,
  dtype: null,
  device: null,
  dtypes: [],
  send,
  reset,
  load,
};
window.__persona = hook;

let tokenizer = null;
let model = null;
let messages = [];
let busy = false;
let stopper = null;

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

function fillSettings(gen) {
  showSettings({
    do_sample: gen.do_sample ?? false,
    temperature: gen.temperature ?? 1.0,
    top_k: gen.top_k ?? 50,
    repetition_penalty: gen.repetition_penalty ?? 1.0,
    min_new_tokens: gen.min_new_tokens ?? 0,
    max_new_tokens: gen.max_new_tokens ?? 256,
  });
}

function showSettings(s) {
  for (const key of SETTINGS) {
    if (!(key in s)) continue;
    const el = $(key);
    if (el.type === "checkbox") el.checked = Boolean(s[key]);
    else el.value = s[key];
  }
}

function readSettings() {
  const s = {};
  for (const key of SETTINGS) {
    const el = $(key);
    s[key] = el.type === "checkbox" ? el.checked : Number(el.value);
  }
  return s;
}

// transformers.js' generate() options, with Hugging Face semantics (top_p is not implemented there).
function generationOptions(s) {
  const opts = {
    max_new_tokens: Math.max(1, Math.floor(s.max_new_tokens ?? 256)),
    min_new_tokens: Math.max(0, Math.floor(s.min_new_tokens ?? 0)),
    repetition_penalty: s.repetition_penalty ?? 1.0,
    do_sample: Boolean(s.do_sample),
  };
  if (opts.do_sample) {
    opts.temperature = s.temperature ?? 1.0;
    opts.top_k = Math.floor(s.top_k ?? 0);
  }
  return opts;
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
      ...generationOptions(readSettings()),
      streamer,
      stopping_criteria: stopper,
    });
    const generated = sequences.slice(null, [promptLength, null]);
    const reply = tokenizer.batch_decode(generated, { skip_special_tokens: true })[0];
    out.textContent = reply; // the exact decode (the streamer holds back partial words)
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
  const gen = await fetchJSON("generation_config.json", {});
  hook.dtypes = manifest.dtypes ?? ["q4"];
  if (manifest.title) {
    $("title").textContent = manifest.title;
    document.title = manifest.title;
  }
  fillSettings(gen);
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
  await load(dtype);
}

main().catch((e) => {
  hook.error = String(e?.stack ?? e);
  setStatus(`Error: ${e?.message ?? e}`, true);
});
