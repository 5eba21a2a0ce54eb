/**
 * Sizes both ways: every layer's size options (disks, the daemon's reserve, console log rotation)
 * parse here, with per-use limits named in the message.
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { thrown } from "../test/helpers/thrown.js";
import { formatBytes, GiB, MAX_SIZE, MiB, parseSize } from "./size.js";

describe("formatBytes", () => {
  it.each([
    [0, "0 B"],
    [12, "12 B"],
    [1023, "1023 B"],
    [4096, "4.0 KiB"],
    [512 * MiB, "512 MiB"],
    [1.5 * GiB, "1.5 GiB"],
    [23.4 * GiB, "23.4 GiB"],
    [1024 * MiB - 1, "1.0 GiB"],
    [MAX_SIZE, "1.0 PiB"],
    [-2 * MiB, "-2.0 MiB"],
  ])("%d -> %s", (n, s) => expect(formatBytes(n)).toBe(s));
});

describe("parseSize", () => {
  it.each([
    ["1024", 1024],
    ["2G", 2 * GiB],
    ["512M", 512 * MiB],
    ["1.5G", 1.5 * GiB],
    ["10K", 10240],
    ["2GiB", 2 * GiB],
    ["2gb", 2 * GiB],
    [" 4 KiB ", 4096],
    ["12B", 12],
    ["1P", MAX_SIZE],
    ["0", 0],
  ])("%s -> %d", (s, n) => expect(parseSize(s)).toBe(n));

  it.each(["", "abc", "G", "1.2.3", "-1G", "-5", "1e9", "2X", "1.5", "2 GiBs", "1.1P", "99999T", "0x10"])("rejects %j", (s) => {
    const e = thrown(() => parseSize(s));
    expect(e.code).toBe("INVALID_ARGUMENT");
    expect(e.message).toContain(JSON.stringify(s));
    expect(e.hint).toBeTruthy();
  });

  it("says why: negative, absurd", () => {
    expect(thrown(() => parseSize("-1G")).message).toMatch(/negative/);
    expect(thrown(() => parseSize("2P")).message).toMatch(/larger than 1\.0 PiB/);
  });

  it("reads back what formatBytes writes, to its precision (property)", () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: MAX_SIZE }), (n) => {
        const back = parseSize(formatBytes(n));
        // one decimal of a unit >= 1: at most 5 % off (rounding), whole numbers above 100 even less
        expect(Math.abs(back - n)).toBeLessThanOrEqual(Math.max(1, n * 0.05));
      }),
    );
  });

  it("round-trips whole numbers of each unit exactly (property)", () => {
    const unit = fc.constantFrom(["", 1], ["K", 1024], ["M", MiB], ["G", GiB], ["T", 1024 * GiB], ["KiB", 1024], ["GB", GiB]) as fc.Arbitrary<[string, number]>;
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 1024 }), unit, (k, [suffix, mult]) => {
        expect(parseSize(`${k}${suffix}`)).toBe(k * mult);
      }),
    );
  });

  it("rejects strings that are not a size (property)", () => {
    const junk = fc.string().filter((s) => !/^\s*(\d+(\.\d+)?|\.\d+)\s*([kmgtp](i?b)?|b)?\s*$/i.test(s));
    fc.assert(
      fc.property(junk, (s) => {
        expect(thrown(() => parseSize(s)).code).toBe("INVALID_ARGUMENT");
      }),
    );
  });
});


describe("parseSize with limits", () => {
  const LOG = { what: "--console-log-size", min: 1024, max: 1024 * GiB };
  it.each([
    ["4096", 4096], ["4K", 4096], ["4k", 4096], ["1M", MiB], ["2G", 2 * GiB], ["512KiB", 512 * 1024], ["64kb", 65536], [" 1M ", MiB], ["1.5M", 1.5 * MiB], ["1T", 1024 * GiB],
  ])("%s", (text, bytes) => expect(parseSize(text, LOG)).toBe(bytes));

  it.each([
    ["1Q", /not a number/], ["", /not a number/], ["K", /not a number/], ["-1K", /negative/], ["0", /smaller than 1\.0 KiB/],
    ["1000", /smaller than 1\.0 KiB/], ["2T", /larger than 1\.0 TiB/], ["99999999999999999G", /larger than/], ["1 M B", /not a number/],
  ])("rejects %j, naming the option and the input", (text, why) => {
    const e = thrown(() => parseSize(text, LOG));
    expect(e.code).toBe("INVALID_ARGUMENT");
    expect(e.message).toMatch(new RegExp(`^--console-log-size: invalid size ${JSON.stringify(text).replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}: `));
    expect(e.message).toMatch(why);
  });
});
