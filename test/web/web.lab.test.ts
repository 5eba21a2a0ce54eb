/**
 * Lab test (real KVM): the web console in a real browser with a real Debian guest. Chromium runs
 * inside the lab beside the daemon (the lab's root filesystem is the host's: the host's
 * /usr/bin/chromium is there, docs/lab.md "Browsers in the lab") and speaks HTTPS to the daemon on
 * the lab's loopback. An operator logs in, creates a VM from the form with the minimal Debian image,
 * sees it running, types `uname -r` into its serial console in the browser and sees the guest
 * kernel's release come back, sees the VM's charts get points, and, with the VMM SIGKILLed, sees
 * `crashed` and the vm-crashed alert on the dashboard without a reload (the 5 s bound is the
 * host test's; the time is printed here). The host's web.test.ts covers the
 * rest (headers, CSP, roles, cookies) with the tiny guest; this one proves the same page with a stock
 * kernel and a shell behind the console.
 */
import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { get as httpsGet } from "node:https";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Browser } from "playwright-core";
import { afterAll, describe, expect, it, onTestFailed } from "vitest";
import { imagePaths, loadImage } from "../../src/images/image.js";
import { ROOTFS_UP_LINE } from "../../src/images/guest-init.js";
import { fillLogin, hasChromium, launchChromium, newPage } from "../helpers/browser.js";
import { startDaemon, tcpPort, until, type TestDaemon } from "../helpers/daemon.js";
import { SYNC_TIMEOUT_MS } from "../helpers/sync-timeout.js";

const PW = "correct horse battery";
/** How long the lab's browser may take to show a crash and its alert (the host's test holds 5 s). */
const LAB_UI_MS = 60_000;
const home = mkdtempSync(join(tmpdir(), "tvweblab-"));
let d: TestDaemon | undefined;
let browser: Browser | undefined;

/** The status of a GET over HTTPS (the daemon's certificate is its own, self-signed). */
function statusOf(url: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = httpsGet(url, { rejectUnauthorized: false, agent: false, timeout: 60_000 }, (res) => {
      res.resume();
      res.on("end", () => resolve(res.statusCode ?? 0));
    });
    req.on("timeout", () => req.destroy(new Error("timed out")));
    req.on("error", reject);
  });
}

/** A progress line: the lab's silence watchdog (docs/lab.md) sees the test is alive, a reader where it is. */
const t0 = performance.now();
let phase = "starting";
const step = (what: string): void => {
  phase = what;
  console.log(`web.lab: ${what} (${((performance.now() - t0) / 1000).toFixed(0)} s)`);
};
// a line a minute while a step takes long (a page load can take minutes here): the watchdog's silence is not this test's
const alive = setInterval(() => console.log(`web.lab: still after "${phase}" (${((performance.now() - t0) / 1000).toFixed(0)} s)`), 60_000);

afterAll(async () => {
  clearInterval(alive);
  await browser?.close();
  if (d !== undefined) {
    for (const v of await d.client.listVms().catch(() => [])) await d.client.removeVm(v.name, { force: true }).catch(() => undefined);
    await d.stop();
  }
  rmSync(home, { recursive: true, force: true });
});

// About 5 min of the lab group (309 s alone in a lab on 2026-12-05, docs/lab.md "A browser in the lab").
describe.skipIf(!hasChromium)("the web console in Chromium with a Debian guest under real KVM", () => {
  it("an operator creates a VM from the form, types into its Debian console, sees its charts, and sees its VMM's crash and alert on the page", async () => {
    onTestFailed(() => {
      if (d !== undefined) console.log(`web.lab: the daemon's log:\n${d.log().slice(-6000)}`);
    });
    // The lab's init brings up no network interface, not even loopback (the lab has no NIC); the
    // browser reaches the daemon over 127.0.0.1, so lo must be up (IFF_UP, include/uapi/linux/if.h).
    if ((Number.parseInt(readFileSync("/sys/class/net/lo/flags", "utf8"), 16) & 0x1) === 0) execFileSync("ip", ["link", "set", "lo", "up"], { timeout: SYNC_TIMEOUT_MS });
    const release = (await loadImage("minimal")).kernel.release;
    expect(existsSync(imagePaths("minimal").rootfs)).toBe(true);

    // one after the other: the lab has one CPU, and a browser starting beside it keeps the daemon
    // past its start-up limit; the browser and its first page take a minute or more here
    // --start-timeout: a VMM (node) starting beside a browser on the lab's one emulated CPU took
    // over the default 60 s to answer on its socket once, on a loaded machine, and was killed for it
    d = await startDaemon({ home, args: ["--listen", "127.0.0.1:0", "--usage-interval", "2", "--start-timeout", "300"] });
    const base = `https://127.0.0.1:${await tcpPort(d)}`;
    // the page over HTTPS from here first: the listener answers on the lab's loopback (a failure
    // here is the network's, not the browser's), and the daemon's first TLS handshake is behind it
    await until("the console's page over HTTPS", async () => ((await statusOf(`${base}/ui/`)) === 200 ? true : undefined), 120_000);
    step("daemon up");
    const errors: string[] = [];
    browser = await launchChromium();
    const { page } = await newPage(browser, errors);
    page.setDefaultTimeout(480_000);
    await d.client.addUser({ name: "ops", role: "operator", password: PW });
    step("daemon and browser up");

    // the first navigation, again if the browser's network stack gave up (net::ERR_TIMED_OUT was
    // seen once with five labs on the machine's two cores): the page is the same either way
    for (let i = 0; ; i++) {
      try {
        await page.goto(`${base}/`);
        break;
      } catch (e) {
        if (i >= 2 || !/net::ERR_/.test(String(e))) throw e;
        step(`navigation failed (${String(e).split("\n")[0]}); again`);
      }
    }
    await fillLogin(page, "ops", PW);
    step("logged in");

    // the create form, as the API's schema builds it
    await page.click("#nav-create");
    await page.waitForSelector("#create");
    await page.fill("#f-name", "weblab");
    await page.fill("#f-image", "minimal");
    await page.fill("#f-memoryMiB", "256");
    await page.click("#create button[type=submit]");
    await page.waitForSelector('#vm-state[data-state="running"]');
    expect(page.url()).toMatch(/#\/vm\/weblab$/);
    step("created from the form: running");

    // The guest boots to its shell with the browser on a blank page: the VM page's live charts and
    // terminal, interpreted (--jitless) on the lab's one emulated CPU, starved the boot (not in
    // userspace after 480 s); then back to the VM's page, whose terminal types a command into it.
    await page.goto("about:blank");
    await until("the guest's userspace", async () => (await d!.client.console("weblab")).toString().includes(ROOTFS_UP_LINE) || undefined, 480_000);
    step("the guest is in userspace");
    await page.goto(`${base}/#/vm/weblab`);
    await page.waitForSelector('#vm-state[data-state="running"]');
    await page.waitForSelector('#console-note[data-connected="true"]');
    await page.click("#console");
    // $((6*7)) is computed by the guest's shell: the echo of the typed line never shows "web-42"
    const rows = async (): Promise<string> => (await page.textContent("#console .xterm-rows")) ?? "";
    let answered = false;
    for (let i = 0; i < 6 && !answered; i++) {
      await page.keyboard.type("uname -r; echo web-$((6*7))\n");
      answered = await until("the guest's answer in the browser's terminal", async () => ((await rows()).includes("web-42") ? true : undefined), 20_000).catch(() => false);
    }
    const screen = await rows();
    expect(screen, screen).toContain("web-42");
    expect(screen).toContain(release);
    step(`the console answered: ${release}`);

    // the VM's charts: points from the daemon's history (usage sampled every 2 s, 10 s buckets)
    await expect.poll(async () => Number((await page.getAttribute("#chart-cpu", "data-points")) ?? 0), { timeout: 120_000, interval: 1000 }).toBeGreaterThan(0);
    await expect.poll(async () => Number((await page.getAttribute("#chart-mem", "data-points")) ?? 0), { timeout: 30_000, interval: 1000 }).toBeGreaterThan(0);
    step("charts have points");

    // The VMM SIGKILLed: the dashboard shows the crash and its alert without a reload. The 5 s the
    // issue asks for is held on the host (test/web/web.test.ts: ~1.4 s); here the browser runs
    // interpreted on the lab's one emulated CPU, where the page reached "crashed" just past 5 s
    // once (2026-12-05), so the time is printed and held to a lab bound.
    await page.click('a[href="#/"]');
    await page.waitForSelector('tr[data-vm="weblab"] [data-state="running"]');
    const pid = (await d.client.getVm("weblab")).pid!;
    const killedAt = Date.now();
    process.kill(pid, "SIGKILL");
    await page.waitForSelector('tr[data-vm="weblab"] [data-state="crashed"]', { timeout: LAB_UI_MS });
    await expect.poll(() => page.textContent("#alerts"), { timeout: Math.max(1, LAB_UI_MS - (Date.now() - killedAt)), interval: 50 }).toMatch(/vm-crashed \(weblab\)/);
    const took = Date.now() - killedAt;
    expect(took).toBeLessThan(LAB_UI_MS);
    step(`crashed and alerted on the page ${took} ms after the SIGKILL`);
    expect(errors).toEqual([]);
  }, 1_500_000);
});
