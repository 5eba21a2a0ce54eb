import { execFileSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { isTypevisorError } from "../errors.js";
import * as libc from "./libc.js";
import { IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, openTap, setLinkUp, tapNameProblem, TUNGETIFF, TUNSETIFF, TUNSETOFFLOAD, TUNSETVNETHDRSZ } from "./tap.js";

/** Whether this process may create TAP devices (root with /dev/net/tun); tests needing it skip otherwise. */
function canCreateTap(): boolean {
  if (!existsSync("/dev/net/tun")) return false;
  try {
    libc.close(openTap(`tvprobe${process.pid % 100000}`).fd);
    return true;
  } catch {
    return false;
  }
}
const tapOk = canCreateTap();

function code(f: () => unknown): string | false {
  try {
    f();
    return false;
  } catch (e) {
    return isTypevisorError(e) && e.code;
  }
}

describe("tap ioctl numbers and names", () => {
  it("match if_tun.h (_IOW('T', nr, int) etc.)", () => {
    expect(TUNSETIFF).toBe(0x400454ca);
    expect(TUNSETOFFLOAD).toBe(0x400454d0);
    expect(TUNGETIFF).toBe(0x800454d2);
    expect(TUNSETVNETHDRSZ).toBe(0x400454d8);
    expect([IFF_TAP, IFF_NO_PI, IFF_VNET_HDR]).toEqual([0x2, 0x1000, 0x4000]);
  });

  it("refuses names the kernel would refuse, before any syscall", () => {
    expect(tapNameProblem("tap0")).toBeUndefined();
    expect(tapNameProblem("x".repeat(15))).toBeUndefined();
    expect(tapNameProblem("x".repeat(16))).toMatch(/at most 15/);
    expect(tapNameProblem("")).toMatch(/empty/);
    for (const n of [".", "..", "a/b", "a:b", "a b"]) expect(tapNameProblem(n)).toBeDefined();
    expect(code(() => openTap("a-very-long-tap-name"))).toBe("TAP_OPEN");
  });
});

describe.skipIf(!tapOk)("openTap on this host's /dev/net/tun (root)", () => {
  const name = `tvtap${process.pid % 100000}`;

  it("creates a non-blocking TAP with a vnet header that vanishes on close", () => {
    const t = openTap(name);
    try {
      expect(t.name).toBe(name);
      expect(t.created).toBe(true);
      expect(existsSync(`/sys/class/net/${name}`)).toBe(true);
      // tun_flags in sysfs: TAP, no PI, vnet header.
      const flags = parseInt(readFileSync(`/sys/class/net/${name}/tun_flags`, "utf8"), 16);
      expect(flags & (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)).toBe(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
      // Nothing queued: a non-blocking read says EAGAIN instead of blocking the device thread.
      expect(libc.readRaw(t.fd, new Uint8Array(2048))).toBe(-libc.EAGAIN);
      setLinkUp(t.name);
      expect(parseInt(readFileSync(`/sys/class/net/${name}/flags`, "utf8"), 16) & 1).toBe(1);
      // Single-queue TAP: a second opener is told it is busy.
      let err: unknown;
      try {
        openTap(name);
      } catch (e) {
        err = e;
      }
      expect(isTypevisorError(err) && err.code).toBe("TAP_OPEN");
      expect((err as Error).message).toMatch(/in use/);
    } finally {
      libc.close(t.fd);
    }
    expect(existsSync(`/sys/class/net/${name}`)).toBe(false);
  });

  it("resolves a name template and refuses an interface that is not a TAP", () => {
    const t = openTap("tvtpl%d");
    try {
      expect(t.name).toMatch(/^tvtpl\d+$/);
    } finally {
      libc.close(t.fd);
    }
    let err: unknown;
    try {
      openTap("lo");
    } catch (e) {
      err = e;
    }
    expect(isTypevisorError(err) && err.code).toBe("TAP_OPEN");
    expect((err as Error).message).toMatch(/not a single-queue TAP/);
  });

  it.skipIf(!existsSync("/usr/sbin/ip") && !existsSync("/sbin/ip"))("attaches to a TAP that already exists (created with iproute2)", () => {
    const pre = `tvpre${process.pid % 100000}`;
    execFileSync("ip", ["tuntap", "add", "dev", pre, "mode", "tap"]);
    try {
      const t = openTap(pre);
      expect(t.created).toBe(false);
      libc.close(t.fd);
      expect(existsSync(`/sys/class/net/${pre}`)).toBe(true); // persistent: still there
    } finally {
      execFileSync("ip", ["tuntap", "del", "dev", pre, "mode", "tap"]);
    }
  });
});
