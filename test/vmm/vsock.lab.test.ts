/**
 * Lab test (real KVM): virtio-vsock with the Firecracker-style host side. The
 * guest runs a small static AF_VSOCK tool (test/fixtures/vsock-tool.c, built
 * here with the host's gcc and added to the initramfs as a second cpio archive).
 */
import { execFileSync } from "node:child_process";
import { SYNC_TIMEOUT_MS } from "../helpers/sync-timeout.js";
import { createHash, randomBytes } from "node:crypto";
import { mkdirSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { connect, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { parseGuestExit, runScriptArg } from "../../src/images/guest-init.js";
import { imagePaths } from "../../src/images/image.js";
import { ConsoleProcess } from "../helpers/console-process.js";

const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;
const TOOL_C = new URL("../fixtures/vsock-tool.c", import.meta.url).pathname;
const sha256 = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");

/** initrd.img + a newc archive holding /bin/vsock-tool (Linux unpacks concatenated archives in order). */
function initrdWithTool(dir: string): string {
  const root = join(dir, "root");
  mkdirSync(join(root, "bin"), { recursive: true });
  execFileSync("gcc", ["-static", "-O2", "-o", join(root, "bin", "vsock-tool"), TOOL_C], { timeout: SYNC_TIMEOUT_MS });
  const extra = execFileSync("sh", ["-c", "find bin | cpio -o -H newc --quiet"], { cwd: root, timeout: SYNC_TIMEOUT_MS });
  const out = join(dir, "initrd-vsock.img");
  writeFileSync(out, Buffer.concat([readFileSync(imagePaths("minimal").initrd), extra]));
  return out;
}

/** Host side of a host-initiated connection: CONNECT, wait for OK, send `data`, collect the echo. */
function hostRoundTrip(uds: string, port: number, data: Buffer): Promise<{ ok: string; echo: Buffer }> {
  return new Promise((resolve, reject) => {
    const s = connect(uds);
    let text = "";
    let ok = "";
    const chunks: Buffer[] = [];
    let got = 0;
    s.on("connect", () => s.write(`CONNECT ${port}\n`));
    s.on("data", (d: Buffer) => {
      if (ok === "") {
        text += d.toString("latin1");
        const nl = text.indexOf("\n");
        if (nl < 0) return;
        ok = text.slice(0, nl);
        const rest = Buffer.from(text.slice(nl + 1), "latin1");
        if (rest.length > 0) chunks.push(rest);
        got += rest.length;
        s.end(data); // send everything, then half-close: the guest's echo loop ends on EOF
        return;
      }
      chunks.push(d);
      got += d.length;
    });
    s.on("end", () => resolve({ ok, echo: Buffer.concat(chunks, got) }));
    s.on("error", reject);
  });
}

describe("virtio-vsock under real KVM", () => {
  it("host->guest and guest->host connections move data both ways intact", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tv-vsock-"));
    const initrd = initrdWithTool(dir);
    const uds = join(dir, "v.sock");
    // Guest-initiated connections to host port 5678 arrive at `${uds}_5678`: echo them back.
    let hostGot = Buffer.alloc(0);
    const server = createServer((c) => {
      c.on("data", (d: Buffer) => {
        hostGot = Buffer.concat([hostGot, d]);
        c.write(d);
      });
      c.on("end", () => c.end());
    });
    await new Promise<void>((r) => server.listen(`${uds}_5678`, r));

    const script = [
      "vsock-tool echo 1234 &",
      "head -c 1048576 /dev/urandom > /tmp/f",
      'echo "f=$(sha256sum /tmp/f | cut -d" " -f1)"',
      "vsock-tool send 2 5678 < /tmp/f > /tmp/b",
      'echo "b=$(sha256sum /tmp/b | cut -d" " -f1)"',
      "wait",
    ].join("\n");
    const p = new ConsoleProcess(process.execPath, [
      BIN, "run", "--no-lab", "--no-reboot", "--image", "minimal", "--initrd", initrd, "--memory", "256",
      "--vsock", `cid=42,uds=${uds}`, "--append", runScriptArg(script),
    ]);
    try {
      await p.waitFor(/vsock-tool: listening on 1234/);
      const data = randomBytes(512 * 1024);
      const rt = await hostRoundTrip(uds, 1234, data);
      expect(rt.ok).toMatch(/^OK \d+$/);
      expect(sha256(rt.echo)).toBe(sha256(data));
      expect(await p.exit()).toBe(0);
    } finally {
      p.kill();
      server.close();
    }
    const out = p.output;
    const f = /f=([0-9a-f]{64})/.exec(out)?.[1];
    expect(f).toBeDefined();
    expect(out).toContain(`b=${f}`);
    expect(sha256(hostGot)).toBe(f);
    expect(parseGuestExit(out)).toBe(0);
  });
});
