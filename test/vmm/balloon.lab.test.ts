/**
 * Lab test (real KVM): virtio-balloon driven through the control API. Inflating
 * takes memory from the guest (its free memory drops), deflating returns it.
 */
import { request } from "node:http";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { ConsoleProcess } from "../helpers/console-process.js";

const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;
// eslint-disable-next-line no-control-regex -- ash follows its prompt with ESC[6n (cursor position query)
const PROMPT = /# (?:\x1b\[6n)?$/;
const running: ConsoleProcess[] = [];
afterEach(() => {
  for (const p of running.splice(0)) p.kill();
});

function api(sock: string, method: string, path: string, body?: unknown): Promise<{ status: number; json: Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath: sock, method, path, headers: { "content-type": "application/json" } }, (res) => {
      let text = "";
      res.on("data", (d: Buffer) => (text += d.toString()));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, json: JSON.parse(text) as Record<string, unknown> }));
    });
    req.on("error", reject);
    req.end(body === undefined ? undefined : JSON.stringify(body));
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe("virtio-balloon under real KVM", () => {
  it("inflating reduces the guest's free memory, deflating returns it; statistics arrive", async () => {
    const sock = join(mkdtempSync(join(tmpdir(), "tv-balloon-")), "vm.sock");
    const p = new ConsoleProcess(process.execPath, [BIN, "run", "--no-lab", "--image", "minimal", "--memory", "512", "--balloon", "--api-socket", sock]);
    running.push(p);
    let at = await p.waitFor(PROMPT);
    const memFree = async (): Promise<number> => {
      p.type("grep MemFree /proc/meminfo\n");
      const end = await p.waitFor(/MemFree:\s+\d+ kB/, at);
      const kib = Number(/MemFree:\s+(\d+) kB/.exec(p.output.slice(at))![1]);
      at = await p.waitFor(PROMPT, end);
      return kib;
    };
    const before = await memFree();
    expect((await api(sock, "PUT", "/balloon", { targetMiB: 200 })).status).toBe(200);
    let actual = 0;
    for (let i = 0; i < 120 && actual < 200 * 256; i++) {
      await sleep(500);
      actual = Number((await api(sock, "GET", "/balloon")).json["actualPages"]);
    }
    expect(actual).toBe(200 * 256);
    const inflated = await memFree();
    expect(before - inflated).toBeGreaterThan(190 * 1024);

    expect((await api(sock, "PUT", "/balloon", { targetMiB: 0 })).status).toBe(200);
    for (let i = 0; i < 120 && actual > 0; i++) {
      await sleep(500);
      actual = Number((await api(sock, "GET", "/balloon")).json["actualPages"]);
    }
    expect(actual).toBe(0);
    const deflated = await memFree();
    expect(deflated - inflated).toBeGreaterThan(190 * 1024);

    expect((await api(sock, "POST", "/balloon/stats")).status).toBe(200);
    let stats: Record<string, unknown> = {};
    for (let i = 0; i < 40 && stats["MEMTOT"] === undefined; i++) {
      await sleep(250);
      stats = (await api(sock, "GET", "/balloon")).json["values"] as Record<string, unknown>;
    }
    expect(Number(stats["MEMTOT"])).toBeGreaterThan(400 * 1024 * 1024);
    expect((await api(sock, "PUT", "/balloon", { targetMiB: -1 })).status).toBe(400);
    expect((await api(sock, "PUT", "/balloon", { targetMiB: 100000 })).status).toBe(400);
    p.type("poweroff\n");
    expect(await p.exit()).toBe(0);
  });
});
