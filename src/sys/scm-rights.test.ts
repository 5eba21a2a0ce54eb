/** SCM_RIGHTS over a real socket pair: the receiver's copies work, and a wrong count is refused with nothing left open. */
import { closeSync, mkdtempSync, openSync, readdirSync, readSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { recvFds, sendFds, seqpacketPair, shutdownRead } from "./scm-rights.js";

const openFds = (): number => readdirSync("/proc/self/fd").length;

describe("SCM_RIGHTS", () => {
  it("passes descriptors whose copies read the same files", () => {
    const d = mkdtempSync(join(tmpdir(), "tvscm-"));
    try {
      const [a, b] = seqpacketPair();
      const files = ["one", "two"].map((n) => {
        writeFileSync(join(d, n), n);
        return openSync(join(d, n), "r");
      });
      sendFds(a, files);
      for (const f of files) closeSync(f);
      const got = recvFds(b, 2);
      expect(got.map((fd) => {
        const buf = Buffer.alloc(3);
        readSync(fd, buf, 0, 3, 0);
        closeSync(fd);
        return buf.toString();
      })).toEqual(["one", "two"]);
      // Nothing waiting: EAGAIN, not a hang.
      expect(() => recvFds(b, 1)).toThrow(/EAGAIN/);
      closeSync(a);
      closeSync(b);
    } finally {
      rmSync(d, { recursive: true, force: true });
    }
  });

  it("refuses a message with another number of descriptors, and closes what came", () => {
    const [a, b] = seqpacketPair();
    const before = openFds();
    sendFds(a, [0, 1, 2]);
    expect(() => recvFds(b, 2)).toThrow(/expected 2 descriptor\(s\).*got 3/);
    expect(openFds()).toBe(before);
    closeSync(a);
    closeSync(b);
  });

  it("a side shut for reading refuses what its peer sends", () => {
    const [a, b] = seqpacketPair();
    shutdownRead(a);
    expect(() => sendFds(b, [0])).toThrow(/EPIPE|errno 32/);
    sendFds(a, [0]); // the other way still works
    const got = recvFds(b, 1);
    expect(got).toHaveLength(1);
    for (const fd of got) closeSync(fd);
    closeSync(a);
    closeSync(b);
  });
});
