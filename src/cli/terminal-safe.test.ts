import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { escapeControls, TerminalSafeStream } from "./terminal-safe.js";

// eslint-disable-next-line no-control-regex
const CONTROL = /[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]/;

describe("guest output for a terminal", () => {
  it("shows escape sequences instead of sending them", () => {
    expect(escapeControls("\x1b]0;owned\x07\x1b[2Jhi\r\n")).toBe("\\x1b]0;owned\\x07\\x1b[2Jhi\r\n");
    expect(escapeControls("8-bit CSI \u009b31m")).toBe("8-bit CSI \\u009b31m");
    expect(escapeControls("tab\there, ünïcødé ✓\n")).toBe("tab\there, ünïcødé ✓\n");
  });

  it("never lets a control character through, whatever the bytes and however they are cut", () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), fc.array(fc.nat(300), { maxLength: 6 }), (bytes, cuts) => {
        const buf = Buffer.from(bytes);
        const whole = new TerminalSafeStream();
        const all = whole.push(buf) + whole.end();
        expect(CONTROL.test(all)).toBe(false);
        const points = [...new Set(cuts.map((c) => c % (buf.length + 1)))].sort((a, b) => a - b);
        const s = new TerminalSafeStream();
        let out = "";
        let at = 0;
        for (const p of [...points, buf.length]) {
          out += s.push(buf.subarray(at, p));
          at = p;
        }
        // chunking changes nothing: a UTF-8 sequence cut in two is decoded whole
        expect(out + s.end()).toBe(all);
      }),
    );
  });
});
