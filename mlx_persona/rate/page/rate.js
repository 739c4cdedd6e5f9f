// The rating page: shows the pair the server hands out, posts each judgement, and moves on once the
// server has committed it. It never learns which model wrote a reply. window.__rate is for tests.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const state = { seq: 0, busy: false, pair: null, rated: 0, total: 0, done: false, error: null };
  window.__rate = state;

  function show(s) {
    state.pair = s.pair; state.rated = s.rated; state.total = s.total; state.done = s.done;
    $("progress").textContent = `${s.rated} / ${s.total} rated`;
    $("rating").hidden = s.done;
    $("done").hidden = !s.done;
    if (s.pair) {
      $("prompt").textContent = s.pair.prompt;
      $("left").textContent = s.pair.left;
      $("right").textContent = s.pair.right;
    }
    $("note").value = "";
  }

  function setError(message) {
    state.error = message;
    $("error").textContent = message || "";
    $("error").hidden = !message;
  }

  async function call(method, path, body) {
    const init = { method, headers: {} };
    if (body !== undefined) { init.headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
    const r = await fetch(path, init);
    const data = await r.json().catch(() => ({}));
    return { status: r.status, data };
  }

  async function act(method, path, body) {
    if (state.busy) return;
    state.busy = true;
    document.querySelectorAll("button").forEach((b) => { b.disabled = true; });
    try {
      let { status, data } = await call(method, path, body);
      let note = null;
      if (status === 409 && data.error && data.error.code === "stale_pair") {
        note = "That pair was no longer open (the server restarted, or it was judged in another tab); nothing " +
               "was saved for it. Judge the pair shown now.";
        ({ status, data } = await call("GET", "/api/next"));
      }
      if (status === 200) { show(data); setError(note); }
      else setError((data.error && data.error.message) || `the server answered ${status}`);
    } catch (e) {
      setError(`the server cannot be reached (${e.message}); the judgement was not saved, try again`);
    } finally {
      state.busy = false;
      state.seq += 1;
      document.querySelectorAll("button").forEach((b) => { b.disabled = false; });
    }
  }

  function choose(choice) {
    if (!state.pair) return;
    act("POST", "/api/judge", { token: state.pair.token, choice, note: $("note").value });
  }
  const undo = () => act("POST", "/api/undo", {});

  document.querySelectorAll("#buttons button").forEach((b) => b.addEventListener("click", () => choose(b.dataset.choice)));
  $("undo").addEventListener("click", undo);
  document.addEventListener("keydown", (e) => {
    if (e.target === $("note")) { if (e.key === "Escape") $("note").blur(); return; }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const keys = { ArrowLeft: "left", "1": "left", ArrowRight: "right", "2": "right", t: "tie", b: "both_bad" };
    if (keys[e.key]) { e.preventDefault(); choose(keys[e.key]); }
    else if (e.key === "u" || e.key === "Backspace") { e.preventDefault(); undo(); }
    else if (e.key === "n") { e.preventDefault(); $("note").focus(); }
  });
  act("GET", "/api/next");
})();
