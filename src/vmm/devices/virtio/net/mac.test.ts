import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { isTypevisorError } from "../../../../errors.js";
import { formatMac, macFromIdentity, parseMac } from "./mac.js";

describe("MAC addresses", () => {
  it("macFromIdentity is stable, locally administered unicast (02:...), and differs per identity", () => {
    const a = macFromIdentity("vm-1234");
    expect(a).toEqual(macFromIdentity("vm-1234"));
    expect(a[0]).toBe(0x02);
    expect(formatMac(a)).toMatch(/^02(:[0-9a-f]{2}){5}$/);
    expect(formatMac(macFromIdentity("vm-1235"))).not.toBe(formatMac(a));
  });

  it("parseMac round-trips through formatMac (property)", () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 6, maxLength: 6 }), (b) => {
        b[0] = b[0]! & 0xfe;
        fc.pre(b.some((x) => x !== 0));
        expect(parseMac(formatMac(b))).toEqual(b);
        expect(parseMac(formatMac(b).toUpperCase().replaceAll(":", "-"))).toEqual(b);
      }),
    );
  });

  it("refuses malformed, multicast and all-zero addresses with NET_MAC", () => {
    const code = (s: string): string | false => {
      try {
        parseMac(s);
        return false;
      } catch (e) {
        return isTypevisorError(e) && e.code;
      }
    };
    for (const s of ["", "02:00:00:00:00", "02:00:00:00:00:00:00", "02:00:00:00:00:0g", "02-00:00:00:00:00", "0200.0000.0001", "2:0:0:0:0:1"]) {
      expect(code(s)).toBe("NET_MAC");
    }
    expect(code("01:00:5e:00:00:01")).toBe("NET_MAC");
    expect(code("ff:ff:ff:ff:ff:ff")).toBe("NET_MAC");
    expect(code("00:00:00:00:00:00")).toBe("NET_MAC");
    expect(formatMac(parseMac(" 52:54:00:AB:cd:01 "))).toBe("52:54:00:ab:cd:01");
  });
});
