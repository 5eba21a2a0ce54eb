import { execFileSync, spawnSync } from "node:child_process";
import { describe, expect, it } from "vitest";
import { LAB_INIT } from "../lab/init.js";
import { GUEST_INIT, MAX_RUN_SCRIPT_CMDLINE, parseGuestExit, runScriptArg } from "./guest-init.js";

const hasBusybox = spawnSync("busybox", ["true"]).status === 0;

describe("typevisor.run= argument", () => {
  it.skipIf(!hasBusybox)("decodes with busybox base64 back to the script, as the guest init does", () => {
    const script = "echo 'a b' \"$((6*7))\"; printf '%s\\n' ü; exit 3";
    const arg = runScriptArg(script);
    expect(arg).toMatch(/^typevisor\.run=[A-Za-z0-9+/=]+$/);
    const decoded = execFileSync("busybox", ["sh", "-c", 'echo "${1#typevisor.run=}" | base64 -d', "sh", arg]).toString();
    expect(decoded).toBe(script);
  });

  it("refuses scripts that do not fit the kernel command line", () => {
    expect(() => runScriptArg("x".repeat(MAX_RUN_SCRIPT_CMDLINE))).toThrow(/too long/);
  });

  it("finds the exit line in console output with CRLF line ends", () => {
    expect(parseGuestExit("boot\r\ntypevisor-guest: exit 42\r\n[ 1.0] reboot: Power down\r\n")).toBe(42);
    expect(parseGuestExit("typevisor-guest: exit\r\n")).toBeUndefined();
  });
});

describe.skipIf(!hasBusybox)("init scripts parse with busybox sh", () => {
  it.each([
    ["guest init", GUEST_INIT],
    ["lab init", LAB_INIT],
  ])("%s", (_name, script) => {
    const r = spawnSync("busybox", ["sh", "-n"], { input: script });
    expect(r.stderr.toString()).toBe("");
    expect(r.status).toBe(0);
  });

  it("a broken script is reported by the same check", () => {
    expect(spawnSync("busybox", ["sh", "-n"], { input: "if true; then\n" }).status).not.toBe(0);
  });

  it("uses only applets this busybox has", () => {
    const applets = new Set(execFileSync("busybox", ["--list"]).toString().trim().split("\n"));
    const used = ["mount", "umount", "insmod", "switch_root", "base64", "poweroff", "grep", "sleep", "uname", "mkdir", "cat", "cp", "chroot", "stty", "hostname", "cttyhack", "sync", "init"];
    for (const a of used) expect(applets.has(a), a).toBe(true);
    for (const a of used.filter((x) => !["init", "cttyhack"].includes(x))) {
      expect(GUEST_INIT.includes(a) || LAB_INIT.includes(a), `${a} is used by an init`).toBe(true);
    }
  });
});
