import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { once } from "node:events";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { HttpTimeoutError, HttpTooLargeError, httpRequest, parseProblem, readBody } from "./http-request.js";

const dir = mkdtempSync(join(tmpdir(), "tv-http-"));
const socketPath = join(dir, "api.sock");

async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
  const body = (await readBody(req)).toString("utf8");
  switch (req.url) {
    case "/echo":
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify({ method: req.method, type: req.headers["content-type"], length: req.headers["content-length"], got: JSON.parse(body) as unknown }));
      return;
    case "/problem":
      res.writeHead(409, { "content-type": "application/problem+json" });
      res.end(JSON.stringify({ type: "urn:typevisor:error:VM_STATE", title: "VM_STATE", status: 409, code: "VM_STATE", detail: "vm a is stopped", hint: "start it" }));
      return;
    case "/text":
      res.writeHead(502, { "content-type": "text/plain" });
      res.end("bad gateway");
      return;
    case "/stall": // headers and part of the body, then silence
      res.writeHead(200, { "content-type": "application/json" });
      res.write('{"a":');
      return;
    case "/cut": // part of the body, then the connection drops
      res.writeHead(200, { "content-type": "application/json", "content-length": "100" });
      res.write('{"a":', () => res.socket?.destroy());
      return;
    case "/hang": // never answers
      return;
    case "/flood": // an answer that does not stop: 64 KiB chunks for as long as the client reads
      res.writeHead(200, { "content-type": "application/json" });
      {
        const chunk = Buffer.alloc(65536, 0x20);
        const more = (): void => {
          while (!res.destroyed && res.write(chunk));
          if (!res.destroyed) res.once("drain", more);
        };
        res.on("close", () => res.removeAllListeners("drain"));
        more();
      }
      return;
  }
  res.writeHead(404).end();
}

const server = createServer((req, res) => void handle(req, res));
beforeAll(async () => {
  server.listen(socketPath);
  await once(server, "listening");
});
afterAll(async () => {
  server.closeAllConnections();
  server.close();
  await once(server, "close");
  rmSync(dir, { recursive: true, force: true });
});

describe("httpRequest over a unix socket", () => {
  it("sends a JSON body with its headers and reads the whole answer", async () => {
    const body = { name: "é", n: [1, 2] };
    const a = await httpRequest({ socketPath, method: "POST", path: "/echo" }, body, 5000);
    expect(a.status).toBe(200);
    expect(JSON.parse(a.body.toString("utf8"))).toEqual({
      method: "POST",
      type: "application/json",
      length: String(Buffer.byteLength(JSON.stringify(body))),
      got: body,
    });
  });

  it("resolves an error answer, whose problem parses", async () => {
    const a = await httpRequest({ socketPath, method: "GET", path: "/problem" });
    expect(a.status).toBe(409);
    expect(parseProblem(a.body)).toEqual({ code: "VM_STATE", detail: "vm a is stopped", hint: "start it" });
  });

  it("a body that is not JSON gives no problem fields", async () => {
    const a = await httpRequest({ socketPath, method: "GET", path: "/text" });
    expect(a.status).toBe(502);
    expect(parseProblem(a.body)).toEqual({});
  });

  it("times out against a server that never answers", async () => {
    const t0 = Date.now();
    const e: unknown = await httpRequest({ socketPath, method: "GET", path: "/hang" }, undefined, 100).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(HttpTimeoutError);
    expect((e as HttpTimeoutError).timeoutMs).toBe(100);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(90);
  });

  it("times out when the body stalls after the headers", async () => {
    await expect(httpRequest({ socketPath, method: "GET", path: "/stall" }, undefined, 100)).rejects.toBeInstanceOf(HttpTimeoutError);
  });

  it("rejects, not hangs, when the connection drops mid-answer", async () => {
    const e: unknown = await httpRequest({ socketPath, method: "GET", path: "/cut" }).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(Error);
    expect(e).not.toBeInstanceOf(HttpTimeoutError);
  });

  it("passes a socket error through", async () => {
    const e: unknown = await httpRequest({ socketPath: join(dir, "none.sock"), method: "GET", path: "/" }).catch((x: unknown) => x);
    expect((e as NodeJS.ErrnoException).code).toBe("ENOENT");
  });

  it("throws before sending a body JSON cannot encode", () => {
    expect(() => httpRequest({ socketPath, method: "POST", path: "/echo" }, { n: 1n })).toThrow(TypeError);
  });
});

describe("parseProblem", () => {
  it("keeps only string fields of a JSON object", () => {
    expect(parseProblem('{"code":"X","detail":7,"hint":null,"status":400}')).toEqual({ code: "X" });
  });
  it("gives {} for anything else", () => {
    for (const s of ["", "null", "[]", '"text"', "42", "{not json"]) expect(parseProblem(s)).toEqual({});
  });
});

describe("an answer that does not stop", () => {
  it("is cut at maxBytes with HttpTooLargeError, not read into memory without end", async () => {
    const e = await httpRequest({ socketPath, path: "/flood" }, undefined, 5000, 1 << 20).then(
      () => undefined,
      (err: unknown) => err,
    );
    expect(e).toBeInstanceOf(HttpTooLargeError);
    expect((e as HttpTooLargeError).maxBytes).toBe(1 << 20);
  });
});

describe("a request after the caller's event loop was busy past the server's keep-alive timeout", () => {
  it("does not reuse a connection the server already closed (EPIPE on a unix socket)", async () => {
    // Two plain node processes (the race does not show inside vitest's worker): a server that drops
    // idle connections after 2 s, and a client, the built module, that blocks its event loop for
    // 3 s between requests, as spawnSync of a slow command does.
    const path = join(dir, "ka.sock");
    const server = spawn(process.execPath, ["-e", `
      const s = require("node:http").createServer((q, r) => { r.writeHead(200, { "content-type": "application/json" }); r.end("{}"); });
      s.keepAliveTimeout = 2000;
      s.listen(${JSON.stringify(path)}, () => console.log("up"));`], { stdio: ["ignore", "pipe", "inherit"] });
    try {
      await once(server.stdout, "data");
      const built = new URL("../../dist/sys/http-request.js", import.meta.url).href;
      const client = spawn(process.execPath, ["--input-type=module", "-e", `
        const { httpRequest } = await import(${JSON.stringify(built)});
        for (let i = 0; i < 3; i++) {
          try { console.log("status", (await httpRequest({ socketPath: ${JSON.stringify(path)}, path: "/" })).status); }
          catch (e) { console.log("error", e.code); }
          Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 3000);
        }`], { stdio: ["ignore", "pipe", "inherit"] });
      let out = "";
      client.stdout.on("data", (d: Buffer) => (out += d.toString()));
      await once(client, "exit");
      expect(out.trim().split("\n")).toEqual(["status 200", "status 200", "status 200"]);
    } finally {
      server.kill();
    }
  }, 30_000);
});
