/**
 * The hand-off mounts (mount-api.ts) on this host's kernel, as root: a file bound under a shared
 * directory reaches a mount namespace that holds that directory as a slave (util-linux's unshare
 * stands in for the jail), read-only when asked, from its first moment; detached, it is gone there too.
 */
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { attachBind, detachMount, makeSharedMount } from "./mount-api.js";

const root = process.getuid?.() === 0;

describe.skipIf(!root)("hand-off mounts", () => {
  const dirs: string[] = [];
  afterEach(() => {
    for (const d of dirs.splice(0)) {
      while (detachMount(join(d, "h", "f")) || detachMount(join(d, "h", "rw")));
      while (detachMount(join(d, "h")));
      rmSync(d, { recursive: true, force: true });
    }
  });

  it("a bind under the shared directory reaches a slave namespace with its flags; detached, it leaves", async () => {
    const d = mkdtempSync(join(tmpdir(), "tvmnt-"));
    dirs.push(d);
    const h = join(d, "h");
    mkdirSync(h);
    writeFileSync(join(d, "src"), "secret-of-the-vm\n");
    writeFileSync(join(d, "src-rw"), "");
    makeSharedMount(h);
    for (const f of ["f", "rw"]) writeFileSync(join(h, f), "");
    // The slave: waits for the file's content, tries to write both, then waits for the bind to go.
    const script = `until [ -s ${h}/f ]; do sleep 0.05; done; cat ${h}/f; (echo x > ${h}/f) 2>/dev/null && echo f-writable || echo f-readonly; (echo y > ${h}/rw) 2>/dev/null && echo rw-writable; until [ ! -s ${h}/f ]; do sleep 0.05; done; echo gone`;
    const ns = spawn("unshare", ["--mount", "--propagation", "slave", "sh", "-c", script], { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    ns.stdout.on("data", (b: Buffer) => (out += b.toString()));
    ns.stderr.on("data", (b: Buffer) => (out += b.toString()));
    await new Promise((r) => setTimeout(r, 300)); // the namespace exists before the binds
    attachBind(join(d, "src"), join(h, "f"), false);
    attachBind(join(d, "src-rw"), join(h, "rw"), true);
    await new Promise((r) => setTimeout(r, 500));
    expect(readFileSync(join(d, "src-rw"), "utf8")).toBe("y\n");
    expect(readFileSync(join(d, "src"), "utf8")).toBe("secret-of-the-vm\n");
    expect(detachMount(join(h, "f"))).toBe(true);
    expect(detachMount(join(h, "f"))).toBe(false);
    const code = await new Promise<number | null>((r) => ns.once("exit", r));
    expect(out).toBe("secret-of-the-vm\nf-readonly\nrw-writable\ngone\n");
    expect(code).toBe(0);
  });

  it("refuses a symlink as the source, and a target that is not there", () => {
    const d = mkdtempSync(join(tmpdir(), "tvmnt-"));
    dirs.push(d);
    const h = join(d, "h");
    mkdirSync(h);
    makeSharedMount(h);
    writeFileSync(join(h, "f"), "");
    writeFileSync(join(d, "target"), "x");
    symlinkSync(join(d, "target"), join(d, "link"));
    expect(() => attachBind(join(d, "link"), join(h, "f"), false)).toThrow(/neither a regular file nor a directory/);
    // The kernel's refusal comes back as the call's error (errno through syscall(2)).
    expect(() => attachBind(join(d, "target"), join(h, "missing"), false)).toThrow(/move_mount .*ENOENT/);
  });
});
