// Drives the admin dashboard in headless Chromium, for the Rust e2e tests.
//
//   node dashboard.mjs <admin base URL> <screenshot.png> <pool> <backend address to drain> [token]
//
// Opens the dashboard, lists its backend rows, drains one backend through the
// API (not through the page) and measures how long the page takes to show it
// as draining, then saves a full-page screenshot. Prints one JSON line:
//   {"title", "backends": [{pool, address, state}], "drain_api_status",
//    "drain_seen_ms" (null: not seen within 5 s), "findings", "console_errors"}
// plus "error" when a step failed but the run went on. Exits 0 when it ran
// (the caller asserts on the JSON), non-zero with a message on stderr when
// it could not run at all. CHROMIUM overrides the browser (default /usr/bin/chromium).

import { existsSync } from 'node:fs';
import { chromium } from 'playwright-core';

const RUN_LIMIT_MS = 25_000;
const ROWS_TIMEOUT_MS = 10_000;
const DRAIN_TIMEOUT_MS = 5_000;
const TOKEN_KEY = 'fulcrum-admin-token'; // the sessionStorage key dashboard.html reads

function fail(message, code = 2) {
  process.stderr.write(`dashboard.mjs: ${message}\n`);
  process.exit(code);
}

const [baseArg, screenshot, pool, address, token] = process.argv.slice(2);
if (!baseArg || !screenshot || !pool || !address) {
  fail('usage: node dashboard.mjs <admin base URL> <screenshot.png> <pool> <backend address> [token]');
}
const base = new URL(baseArg.endsWith('/') ? baseArg : `${baseArg}/`).href;
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
if (!existsSync(executablePath)) fail(`no Chromium at ${executablePath} (set CHROMIUM)`, 3);

let browser = null;
const limit = setTimeout(() => {
  process.stderr.write(`dashboard.mjs: gave up after ${RUN_LIMIT_MS} ms\n`);
  const closing = browser ? browser.close().catch(() => {}) : Promise.resolve();
  Promise.race([closing, new Promise((r) => setTimeout(r, 2000))]).then(() => process.exit(4));
}, RUN_LIMIT_MS);

async function run() {
  try {
    browser = await chromium.launch({
      executablePath,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
        '--disable-component-update', '--disable-sync'],
      timeout: 10_000,
    });
  } catch (e) {
    fail(`cannot launch Chromium at ${executablePath}: ${e.message}`, 3);
  }
  const out = { title: null, backends: [], drain_api_status: null, drain_seen_ms: null, findings: 0, console_errors: [] };
  const errors = [];
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    if (token) {
      // The page's own mechanism: the token it keeps in sessionStorage after the login form.
      await context.addInitScript(([key, value]) => sessionStorage.setItem(key, value), [TOKEN_KEY, token]);
      // And the page itself, in case `GET /` needs the token too.
      await context.route((url) => url.href === base, (route) =>
        route.continue({ headers: { ...route.request().headers(), authorization: `Bearer ${token}` } }));
    }
    const page = await context.newPage();
    page.on('console', (m) => { if (m.type() === 'error') out.console_errors.push(m.text()); });
    page.on('pageerror', (e) => out.console_errors.push(`pageerror: ${e.message}`));

    const response = await page.goto(base, { waitUntil: 'domcontentloaded', timeout: ROWS_TIMEOUT_MS });
    if (!response || !response.ok()) errors.push(`GET ${base} answered ${response ? response.status() : 'nothing'}`);
    out.title = await page.title();

    let rows = true;
    try {
      await page.waitForSelector('tr[data-backend]', { timeout: ROWS_TIMEOUT_MS });
    } catch {
      rows = false;
      errors.push(`no backend rows within ${ROWS_TIMEOUT_MS} ms`);
    }
    out.backends = await page.$$eval('tr[data-backend]', (trs) =>
      trs.map((tr) => ({ pool: tr.dataset.pool, address: tr.dataset.backend, state: tr.dataset.state })));

    if (rows) {
      const t0 = Date.now();
      try {
        const url = `${base}backends/${encodeURIComponent(pool)}/${encodeURIComponent(address)}/drain`;
        const res = await fetch(url, {
          method: 'POST',
          headers: token ? { authorization: `Bearer ${token}` } : {},
          signal: AbortSignal.timeout(DRAIN_TIMEOUT_MS),
        });
        out.drain_api_status = res.status;
        if (!res.ok) errors.push(`drain answered ${res.status}: ${(await res.text()).trim()}`);
      } catch (e) {
        errors.push(`drain request failed: ${e.message}`);
      }
      if (out.drain_api_status !== null) {
        try {
          await page.waitForFunction(([p, a]) => [...document.querySelectorAll('tr[data-backend]')]
            .some((tr) => tr.dataset.pool === p && tr.dataset.backend === a && tr.dataset.state === 'draining'),
          [pool, address], { timeout: Math.max(0, DRAIN_TIMEOUT_MS - (Date.now() - t0)), polling: 20 });
          out.drain_seen_ms = Date.now() - t0;
        } catch {
          errors.push(`the page did not show ${pool}/${address} draining within ${DRAIN_TIMEOUT_MS} ms`);
        }
      }
    }

    // The troubleshooter renders something (findings, "No findings.", or "unavailable") once it answered.
    await page.waitForSelector('#findings > *', { timeout: 3_000 }).catch(() => {});
    out.findings = await page.locator('#findings [data-kind]').count();
    try {
      await page.screenshot({ path: screenshot, fullPage: true, timeout: 5_000 });
    } catch (e) {
      errors.push(`screenshot: ${e.message}`);
    }
  } finally {
    await browser.close().catch(() => {});
  }
  if (errors.length) out.error = errors.join('; ');
  process.stdout.write(`${JSON.stringify(out)}\n`);
}

run().then(
  () => { clearTimeout(limit); process.exit(0); },
  (e) => { clearTimeout(limit); fail(e && e.stack ? e.stack : String(e)); },
);
