/**
 * A fuzzer over every route in the route table, against a real daemon with
 * real VMMs (tiny guests): random paths, queries, methods, headers and bodies,
 * sent raw so that nothing is tidied on the way (wrong content lengths, broken
 * chunked encoding, pipelining, upgrade and HTTP/2 attempts, hang-ups at every
 * stage, trickled bytes). Issue: "no request, however malformed, on any route
 * ... makes the daemon exit or answer 5xx for the client's mistake".
 *
 * At least 10,000 requests per run (TYPEVISOR_FUZZ_REQUESTS to change it;
 * TYPEVISOR_FUZZ_SEED replays a run: a failure prints its seed and the requests
 * that were answered 5xx).
 */
import { existsSync, mkdirSync, mkdtempSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { prng } from "../helpers/prng.js";
import { API_ROUTES } from "../../src/api/table.js";
import { writeTinyKernel } from "../helpers/tiny-kernel.js";
import { startDaemon, type TestDaemon } from "../helpers/daemon.js";

const hasKvm = existsSync("/dev/kvm");
const REQUESTS = Number(process.env["TYPEVISOR_FUZZ_REQUESTS"] ?? 10_000);
const SEED = Number(process.env["TYPEVISOR_FUZZ_SEED"] ?? Date.now() % 2 ** 31);
/** Exchanges in flight at once. */
const PARALLEL = 16;
/** An exchange the daemon leaves open (a stream, an upgrade, a body it still waits for) is ended by the client after this. */
const EXCHANGE_MS = 400;

/** Every route the daemon serves: the REST table, and the ones outside it. */
const TABLE: { method: string; url: string }[] = [
  ...API_ROUTES.map((r) => ({ method: r.method, url: r.url })),
  { method: "GET", url: "/openapi.json" },
  { method: "GET", url: "/metrics" },
  { method: "GET", url: "/v1/vms/:name/console/attach" },
];

const QUERY_KEYS = ["start", "force", "follow", "after", "limit", "vm", "tail", "x", "", "__proto__", "constructor"];
const QUERY_VALUES = ["true", "false", "1", "0", "-1", "1e400", "NaN", "9007199254740993", "", "%", "%zz", "a".repeat(300), "[]", "{}", "fz-a"];
const METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT", "PRI", "FOO", "get", ""];
const CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/json; charset=latin1", "*/*", "", "\u00ff"];

interface Gen {
  rnd: () => number;
  pick: <T>(xs: readonly T[]) => T;
  chance: (p: number) => boolean;
  json: () => unknown;
  bytes: (n: number) => Buffer;
}

function gen(seed: number, kernel: string): Gen & { name: () => string; body: () => Buffer; path: (url: string) => string } {
  const rnd = prng(seed);
  const pick = <T,>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)]!;
  const chance = (p: number): boolean => rnd() < p;
  const jsonPool = fc.sample(fc.jsonValue({ maxDepth: 4 }), { seed, numRuns: 500 });
  const json = (): unknown => pick(jsonPool);
  const bytes = (n: number): Buffer => Buffer.from(Array.from({ length: n }, () => Math.floor(rnd() * 256)));
  const name = (): string =>
    pick([
      () => pick(["fz-a", "fz-b", "fz-run"]),
      () => "nosuchvm",
      () => encodeURIComponent(bytes(1 + Math.floor(rnd() * 12)).toString("latin1")),
      () => pick(["%", "%z", "%zz", "%E0%A4%A", "%00", "%2e%2e", "..", ".", "%2F", "a%2fb", "%C0%AF", "%ff%fe", "x".repeat(70), "x".repeat(5000), "\u00e9", "a b", "~", "%25"]),
    ])();
  const path = (url: string): string => {
    let p = url.replace(":name", () => name()).replace(":disk", () => pick(["disk1", "1", "disk0", "disk99", "../x", "%2e%2e", "disk-1", "x".repeat(300)]));
    if (chance(0.05)) p = p.replace(/\//g, () => pick(["/", "//", "/./", "/../"]));
    if (chance(0.03)) p += pick(["/", "/x", "/..", "%00", "#frag", "/console/attach/x"]);
    if (chance(0.02)) p = pick(["*", "", "http://x/v1/health", "v1/health", "/" + "a/".repeat(500), "/\u00ff"]);
    if (chance(0.35)) {
      const n = 1 + Math.floor(rnd() * 3);
      const q = Array.from({ length: n }, () => (chance(0.1) ? pick(["&", "=", "&&=", "%", "a=b=c"]) : `${pick(QUERY_KEYS)}=${pick(QUERY_VALUES)}`));
      p += "?" + q.join("&");
    }
    return p;
  };
  const body = (): Buffer =>
    pick([
      () => Buffer.alloc(0),
      () => Buffer.from(JSON.stringify(json()) ?? "null"),
      () => Buffer.from(JSON.stringify({ name: chance(0.5) ? `fz-${Math.floor(rnd() * 20)}` : json(), kernel: chance(0.7) ? kernel : json(), memoryMiB: pick([16, 64, 64, -1, 1e12, "64", null]), rng: false, ...(chance(0.3) ? { cpus: json() } : {}), ...(chance(0.2) ? { extra: json() } : {}) })),
      () => Buffer.from(JSON.stringify({ force: json(), timeoutSeconds: pick([0, 1, -1, 1e9, "x", null]) })),
      // pools and extra disks: paths inside the test's own directory only (a pool writes its marker there)
      () => Buffer.from(JSON.stringify({ name: chance(0.7) ? pick(["fz-p", "fz-q", "default"]) : json(), path: pick([`${dirname(kernel)}/pool`, "relative", "/", `${dirname(kernel)}/../x`, json()]), ...(chance(0.5) ? { quota: pick(["1M", "0", -1, "1e400", 1e18, json()]) } : {}) })),
      () => Buffer.from(JSON.stringify({ size: pick(["1M", "0", -1, "64T", "1e400", 512, json()]), ...(chance(0.5) ? { pool: pick(["default", "fz-p", "nope", json()]) } : {}), ...(chance(0.5) ? { format: pick(["qcow2", "raw", "vmdk", json()]) } : {}) })),
      () => bytes(Math.floor(rnd() * 200)),
      () => Buffer.from('{"name":'),
      () => Buffer.from('{"__proto__":{"x":1},"constructor":{"prototype":{}}}'),
      () => Buffer.alloc(70 * 1024, 0x20),
    ])();
  return { rnd, pick, chance, json, bytes, name, body, path };
}

/** One request as raw bytes, with the header lies and encodings a hostile client would use. */
function request(g: ReturnType<typeof gen>, close: boolean): Buffer {
  const r = g.pick(TABLE);
  const method = g.chance(0.85) ? r.method : g.pick(METHODS);
  const body = method === "GET" && g.chance(0.8) ? Buffer.alloc(0) : g.body();
  const headers: string[] = [];
  if (g.chance(0.97)) headers.push("Host: fuzz");
  if (body.length > 0 || g.chance(0.1)) headers.push(`Content-Type: ${g.pick(CONTENT_TYPES)}`);
  let payload = body;
  const framing = g.rnd();
  if (framing < 0.75) headers.push(`Content-Length: ${body.length}`);
  else if (framing < 0.8) headers.push(`Content-Length: ${Math.max(0, body.length - 1 - Math.floor(g.rnd() * 10))}`);
  else if (framing < 0.83) headers.push(`Content-Length: ${body.length + 1 + Math.floor(g.rnd() * 100)}`);
  else if (framing < 0.86) headers.push(g.pick(["Content-Length: -1", "Content-Length: abc", "Content-Length: 1e3", "Content-Length: 99999999999999999999", `Content-Length: ${body.length}\r\nContent-Length: ${body.length + 1}`]));
  else if (framing < 0.95) {
    headers.push("Transfer-Encoding: chunked");
    const chunks = body.length > 0 ? [body.subarray(0, body.length >> 1), body.subarray(body.length >> 1)] : [];
    const enc = chunks.filter((c) => c.length > 0).map((c) => Buffer.concat([Buffer.from(`${c.length.toString(16)}\r\n`), c, Buffer.from("\r\n")]));
    const end = g.pick(["0\r\n\r\n", "0\r\n\r\n", "zz\r\n", "ffffffffffffffff\r\nx\r\n", "0\r\nTrailer: x\r\n\r\n", ""]);
    payload = Buffer.concat([...enc, Buffer.from(end)]);
    if (g.chance(0.1)) headers.push(`Content-Length: ${body.length}`);
  }
  if (r.url.endsWith("/attach") || g.chance(0.03)) headers.push("Connection: Upgrade", `Upgrade: ${g.pick(["tcp", "tcp", "h2c", "websocket", "TCP", ""])}`);
  else if (close) headers.push("Connection: close");
  if (g.chance(0.05)) headers.push(g.pick(["Expect: 100-continue", "X-Big: " + "b".repeat(20_000), "Bad Header: x", "X-\u00ff: \u00ff", "Accept: */*", "Cookie: " + "c=1; ".repeat(200), "X-Forwarded-For: 1.2.3.4", "Authorization: Basic Og=="]));
  // the gate's parsing: a credential on the socket is checked even for root (401, then 429 once locked out)
  if (g.chance(0.08)) {
    headers.push(`Authorization: ${g.pick([
      () => "Bearer",
      () => `Bearer tvt_${g.bytes(6).toString("hex")}_${g.bytes(32).toString("base64url")}`,
      () => `Bearer ${"A".repeat(Math.floor(g.rnd() * 15_000))}`,
      () => `bearer ${g.bytes(20).toString("base64")}`,
      () => g.bytes(Math.floor(g.rnd() * 60)).toString("latin1").replace(/[\r\n]/g, ""),
      () => `Bearer tvt_${"0".repeat(12)}_${"x".repeat(43)}, Bearer y`,
    ])()}`);
  }
  const version = g.chance(0.97) ? "HTTP/1.1" : g.pick(["HTTP/1.0", "HTTP/2.0", "HTTP/9.9", "HTP/1.1", ""]);
  return Buffer.concat([Buffer.from(`${method} ${g.path(r.url)} ${version}\r\n${headers.join("\r\n")}\r\n\r\n`, "latin1"), payload]);
}

/**
 * The status codes of the responses in `data`, parsed in order (a 101 or an
 * event/console stream ends the parse: what follows is not HTTP, and a guest's
 * echo of a pipelined request must not be read as a response).
 */
export function statuses(data: Buffer): number[] {
  const out: number[] = [];
  let off = 0;
  while (off < data.length) {
    const headEnd = data.indexOf("\r\n\r\n", off, "latin1");
    if (headEnd < 0) break;
    const head = data.subarray(off, headEnd).toString("latin1");
    const m = /^HTTP\/1\.[01] (\d{3})/.exec(head);
    if (m === null) break;
    const status = Number(m[1]);
    out.push(status);
    if (status === 101 || /content-type: (text\/event-stream|application\/octet-stream)/i.test(head)) break;
    off = headEnd + 4;
    const len = /\r\ncontent-length: (\d+)/i.exec(head);
    if (len !== null) off += Number(len[1]);
    else if (/\r\ntransfer-encoding: chunked/i.test(head)) {
      const end = data.indexOf("\r\n0\r\n\r\n", off - 2, "latin1");
      if (end < 0) break;
      off = end + 7;
    }
  }
  return out;
}

type Behaviour = "whole" | "pipeline" | "hang-up" | "half" | "trickle" | "h2-preface";

/** Send one exchange on a fresh connection; resolve with what came back. */
function exchange(socketPath: string, pieces: Buffer[], behaviour: Behaviour): Promise<Buffer> {
  return new Promise((resolve) => {
    const s = connect(socketPath);
    const got: Buffer[] = [];
    let done = false;
    const finish = (): void => {
      if (done) return;
      done = true;
      clearTimeout(t);
      s.destroy();
      resolve(Buffer.concat(got));
    };
    const t = setTimeout(finish, EXCHANGE_MS);
    s.on("data", (d: Buffer) => got.push(d));
    s.on("error", finish);
    s.on("close", finish);
    s.on("connect", () => {
      const all = Buffer.concat(pieces);
      if (behaviour === "hang-up") {
        s.write(all.subarray(0, Math.max(1, all.length >> 2)));
        finish();
      } else if (behaviour === "half") {
        s.end(all.subarray(0, all.length >> 1));
      } else if (behaviour === "trickle") {
        let i = 0;
        const step = Math.max(1, Math.ceil(all.length / 4));
        const next = (): void => {
          if (done) return;
          s.write(all.subarray(i, i + step));
          i += step;
          if (i < all.length) setTimeout(next, 40);
        };
        next();
      } else {
        s.write(all);
      }
    });
  });
}

function exchangeOf(g: ReturnType<typeof gen>): { pieces: Buffer[]; behaviour: Behaviour } {
  const x = g.rnd();
  if (x < 0.01) return { pieces: [Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), g.bytes(24)], behaviour: "h2-preface" };
  if (x < 0.13) {
    const n = 2 + Math.floor(g.rnd() * 3);
    return { pieces: Array.from({ length: n }, (_, i) => request(g, i === n - 1)), behaviour: "pipeline" };
  }
  if (x < 0.21) return { pieces: [request(g, true)], behaviour: "hang-up" };
  if (x < 0.26) return { pieces: [request(g, true)], behaviour: "half" };
  if (x < 0.27) return { pieces: [request(g, true)], behaviour: "trickle" };
  return { pieces: [request(g, true)], behaviour: "whole" };
}

describe.skipIf(!hasKvm)(`a fuzzer over every route (seed ${SEED})`, () => {
  let d: TestDaemon;
  let kernel: string;

  beforeAll(async () => {
    const dir = mkdtempSync(join(tmpdir(), "tvfz-"));
    kernel = join(dir, "tiny.bin");
    writeTinyKernel(kernel);
    // A directory pool creates may name (the fuzzer's bodies point there, never elsewhere on the host).
    mkdirSync(join(dir, "pool"));
    d = await startDaemon({ args: ["--force-kvm", "--allow-files", dir] });
    // VMs for the fuzzer to find: stopped ones, and one running, so that actions reach real VMMs
    for (const name of ["fz-a", "fz-b"]) await d.client.createVm({ name, kernel, memoryMiB: 64, rng: false });
    await d.client.createVm({ name: "fz-run", kernel, memoryMiB: 64, rng: false }, { start: true });
  }, 60_000);

  // As long as the set-up may take. With seed 1176699468 the daemon's stop hung here: a connection
  // the fuzzer left kept the HTTP server's close waiting, and then a handle kept the process up
  // (api/server.ts destroys every socket at close; the daemon exits 2 s after its orderly shutdown).
  afterAll(async () => {
    if (d === undefined) return;
    for (const vm of await d.client.listVms().catch(() => [])) await d.client.removeVm(vm.name, { force: true }).catch(() => undefined);
    await d.stop();
  }, 60_000);

  it(`answers ${REQUESTS} hostile requests without a 5xx, and lives`, async () => {
    const g = gen(SEED, kernel);
    let sent = 0;
    let answered = 0;
    const byStatus = new Map<number, number>();
    const bad: string[] = [];
    const worker = async (): Promise<void> => {
      while (sent < REQUESTS && d.proc.exitCode === null) {
        const { pieces, behaviour } = exchangeOf(g);
        sent += pieces.length;
        const reply = await exchange(d.socket, pieces, behaviour);
        for (const s of statuses(reply)) {
          answered++;
          byStatus.set(s, (byStatus.get(s) ?? 0) + 1);
          if (s >= 500 && bad.length < 10) bad.push(`${s} (${behaviour}) for ${JSON.stringify(Buffer.concat(pieces).subarray(0, 600).toString("latin1"))}`);
        }
      }
    };
    await Promise.all(Array.from({ length: PARALLEL }, worker));
    const summary = `seed ${SEED}: ${sent} requests sent, ${answered} answers; by status ${JSON.stringify(Object.fromEntries([...byStatus].sort((a, b) => a[0] - b[0])))}`;
    console.log(summary);
    expect(d.proc.exitCode, `${summary}\n${d.log().slice(-3000)}`).toBeNull();
    expect(bad, summary).toEqual([]);
    expect(sent).toBeGreaterThanOrEqual(REQUESTS);
    // the fuzzer reached the handlers, not only the HTTP parser: 2xx, 4xx of our own, and 404s all came back
    expect(byStatus.get(200) ?? 0).toBeGreaterThan(0);
    expect(byStatus.get(400) ?? 0).toBeGreaterThan(0);
    expect(byStatus.get(404) ?? 0).toBeGreaterThan(0);
    // nothing reached the last-resort handler: each fault there is a bug
    expect(d.log()).not.toContain("last-resort handler caught");
    const h = await d.client.health();
    expect(h.pid).toBe(d.proc.pid);
  }, 600_000);
});
