import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { ConsoleFilter, parseMarker, type ConsoleEvent } from "./console.js";

const nonce = "0123abcd";
const M = `@@TVLAB:${nonce}:`;

function feed(chunks: string[]): { output: string; events: ConsoleEvent[] } {
  const f = new ConsoleFilter(nonce);
  let output = "";
  const events: ConsoleEvent[] = [];
  for (const c of chunks) {
    const r = f.push(c);
    output += r.output;
    events.push(...r.events);
  }
  return { output, events };
}

describe("ConsoleFilter", () => {
  it("passes only the command's output, however the stream is split into chunks", () => {
    fc.assert(
      fc.property(fc.string(), fc.string(), fc.string(), fc.integer({ min: 0, max: 255 }), fc.array(fc.nat(), { maxLength: 6 }), (boot, out, after, code, cuts) => {
        // output that does not itself contain the marker prefix
        fc.pre(!out.includes(M) && !boot.includes(M));
        const stream = `${boot}${M}start@@\n${out}${M}exit:${code}@@\n${after}`;
        const points = [...new Set(cuts.map((c) => c % (stream.length + 1)))].sort((a, b) => a - b);
        const chunks: string[] = [];
        let last = 0;
        for (const p of points) {
          chunks.push(stream.slice(last, p));
          last = p;
        }
        chunks.push(stream.slice(last));
        const r = feed(chunks);
        expect(r.output).toBe(out);
        expect(r.events).toEqual([{ kind: "start" }, { kind: "exit", code }]);
      }),
    );
  });

  it("byte by byte, with markers of another nonce passed through as output", () => {
    const other = "@@TVLAB:ffff:exit:1@@";
    const stream = `kernel noise\r\n${M}start@@\r\nline 1\n${other}\n@@ not a marker\n${M}exit:0@@\nreboot: Power down\n`;
    const r = feed([...stream]);
    expect(r.output).toBe(`line 1\n${other}\n@@ not a marker\n`);
    expect(r.events).toEqual([{ kind: "start" }, { kind: "exit", code: 0 }]);
  });

  it("reports lab errors seen during boot", () => {
    const r = feed([`x\n${M}error:no /dev/kvm in the lab@@\n`]);
    expect(r.events).toEqual([{ kind: "error", message: "no /dev/kvm in the lab" }]);
    expect(r.output).toBe("");
  });

  it("parses marker bodies strictly", () => {
    expect(parseMarker("exit:127")).toEqual({ kind: "exit", code: 127 });
    expect(parseMarker("exit:-1")).toBeUndefined();
    expect(parseMarker("exit:")).toBeUndefined();
    expect(parseMarker("starting")).toBeUndefined();
  });
});
