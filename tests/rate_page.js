// Drives the rating page (mlx-persona rate) in headless Chromium for tests/test_rate.py.
// argv[2]: a JSON file {chromium, url, phases: [[action, ...], ...]}. Each action is
//   {key: "ArrowLeft"} | {click: "#pick-right"} | {note: "text", key: "2"} (n, type, Esc, then key);
// after each, it waits for the page to finish the request and records what the page showed before and
// after. Between phases it prints {"phase": i} and reads one line from stdin: the URL to load next (the
// test restarts the server there), or "same" to go on. Every /api/ response body is kept.
const { chromium } = require(process.env.PLAYWRIGHT_CORE);
const fs = require("fs"), os = require("os"), path = require("path"), readline = require("readline");

const lines = readline.createInterface({ input: process.stdin });
const nextLine = (() => { const it = lines[Symbol.asyncIterator](); return async () => (await it.next()).value; })();

(async () => {
  const cfg = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "rate-chromium-"));
  const out = { steps: [], responses: [], logs: [], texts: [] };
  let context = null;
  const snap = (page) => page.evaluate(() => ({
    rated: window.__rate.rated, total: window.__rate.total, done: window.__rate.done, error: window.__rate.error,
    seq: window.__rate.seq, progress: document.getElementById("progress").textContent,
    prompt: document.getElementById("prompt").textContent, left: document.getElementById("left").textContent,
    right: document.getElementById("right").textContent }));
  try {
    context = await chromium.launchPersistentContext(profile, { executablePath: cfg.chromium, headless: true,
      args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-sync"] });
    const page = context.pages()[0] ?? (await context.newPage());
    page.on("console", (m) => out.logs.push(`${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => out.logs.push(`pageerror: ${e.message}`));
    page.on("response", async (r) => { if (r.url().includes("/api/")) out.responses.push(await r.text().catch(() => "")); });
    let url = cfg.url;
    for (const [p, actions] of cfg.phases.entries()) {
      if (p > 0) {
        console.log(JSON.stringify({ phase: p }));
        const answer = (await nextLine()).trim();
        if (answer !== "same") url = answer;
      }
      if (url) {
        await page.goto(url);
        await page.waitForFunction(() => window.__rate && window.__rate.seq > 0, null, { timeout: 30000 });
        url = null;
      }
      for (const action of actions) {
        const before = await snap(page);
        if (action.note !== undefined) {
          await page.keyboard.press("n");
          await page.keyboard.type(action.note);
          await page.keyboard.press("Escape");
        }
        if (action.click) await page.click(action.click);
        else await page.keyboard.press(action.key);
        await page.waitForFunction((s) => window.__rate.seq > s && !window.__rate.busy, before.seq, { timeout: 30000 });
        out.steps.push({ phase: p, action, before, after: await snap(page) });
        out.texts.push(await page.evaluate(() => document.documentElement.outerHTML));
      }
    }
  } catch (e) {
    out.error = String((e && e.stack) || e);
  }
  await context?.close().catch(() => {});
  fs.rmSync(profile, { recursive: true, force: true });
  process.stdout.write(JSON.stringify(out) + "\n", () => process.exit(0));
})();
