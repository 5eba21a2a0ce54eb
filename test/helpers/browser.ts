/**
 * Debian's Chromium driven by playwright-core, for the web console's tests (test/web/): on the
 * host (web.test.ts) and inside the KVM lab (web.lab.test.ts), where the host's /usr/bin/chromium
 * is there too (the lab's root filesystem is the host's, docs/lab.md).
 */
import { existsSync } from "node:fs";
import { chromium, type Browser, type BrowserContext, type Page } from "playwright-core";

export const CHROMIUM = process.env["CHROMIUM"] ?? "/usr/bin/chromium";
export const hasChromium = existsSync(CHROMIUM);

/**
 * Headless, as root: --no-sandbox (Chromium refuses to run its sandbox as root), no GPU, and no
 * /dev/shm for its shared memory (a small /dev/shm, as in containers and the lab, crashes tabs).
 * In the lab, V8 without its JIT (`--jitless`): the lab's CPU is QEMU's emulator (TCG), which
 * translates guest code into host code and must throw translations away whenever code pages are
 * written, which is what a JIT does all the time; interpreted, the page's scripts ran in 15 s
 * there instead of 69 s (docs/lab.md "A browser in the lab").
 */
export function launchChromium(): Promise<Browser> {
  const lab = process.env["TYPEVISOR_IN_LAB"] === "1" ? ["--js-flags=--jitless"] : [];
  return chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", ...lab] });
}

/**
 * A fresh context (no cookies) and page at 1280×800 that records the page's errors into `errors`:
 * uncaught exceptions and console errors, except the browser's own "failed to load resource: the
 * server responded with a status of 4xx" for a refusal the test provokes on purpose (the page
 * handles those and shows them), and its "WebSocket connection ... failed: ... Unexpected response
 * code: 4xx" for a console socket the daemon refused because the VM stopped while it was being
 * opened (the page shows the console closed).
 */
export async function newPage(browser: Browser, errors: string[]): Promise<{ ctx: BrowserContext; page: Page }> {
  const ctx = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 800 } });
  const page = await ctx.newPage();
  page.on("console", (m) => {
    if (m.type() === "error" && !/status of 4\d\d|WebSocket connection to .* failed: .*Unexpected response code: 4\d\d/.test(m.text())) errors.push(m.text());
  });
  page.on("pageerror", (e) => errors.push(String(e)));
  return { ctx, page };
}

/** Log in through the page's form (and the TOTP code when given); resolves once the navigation shows. */
export async function loginPage(page: Page, base: string, user: string, password: string, code?: string): Promise<void> {
  await page.goto(`${base}/`);
  await fillLogin(page, user, password, code);
}

/** The login form of a page already loaded. */
export async function fillLogin(page: Page, user: string, password: string, code?: string): Promise<void> {
  await page.fill("#user", user);
  await page.fill("#password", password);
  if (code !== undefined) await page.fill("#totp", code);
  await page.click("#login button[type=submit]");
  await page.waitForSelector("#nav:not([hidden])");
}
