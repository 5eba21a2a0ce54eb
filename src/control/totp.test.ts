import { describe, expect, it } from "vitest";
import { base32Decode, base32Encode, hotp, otpauthUri, totp, totpStep, verifyTotp } from "./totp.js";

// RFC 6238 Appendix B (SHA-1 rows): the seed is the ASCII "12345678901234567890", 8 digits.
const SEED = Buffer.from("12345678901234567890", "ascii");
const VECTORS: [number, string][] = [
  [59, "94287082"],
  [1111111109, "07081804"],
  [1111111111, "14050471"],
  [1234567890, "89005924"],
  [2000000000, "69279037"],
  [20000000000, "65353130"],
];

describe("TOTP (RFC 6238 over RFC 4226)", () => {
  it("gives RFC 6238 Appendix B's SHA-1 test values", () => {
    for (const [t, want] of VECTORS) expect(totp(SEED, t * 1000, 8), `T=${t}`).toBe(want);
  });

  it("gives RFC 4226 Appendix D's HOTP values", () => {
    const want = ["755224", "287082", "359152", "969429", "338314", "254676", "287922", "162583", "399871", "520489"];
    want.forEach((w, i) => expect(hotp(SEED, i), `count ${i}`).toBe(w));
  });

  it("accepts one step either side, refuses further and refuses a replay", () => {
    const t = 1_700_000_000_000;
    const s = totpStep(t);
    expect(verifyTotp(SEED, totp(SEED, t), t, undefined)).toBe(s);
    expect(verifyTotp(SEED, totp(SEED, t - 30_000), t, undefined)).toBe(s - 1);
    expect(verifyTotp(SEED, totp(SEED, t + 30_000), t, undefined)).toBe(s + 1);
    expect(verifyTotp(SEED, totp(SEED, t - 60_000), t, undefined)).toBeUndefined();
    expect(verifyTotp(SEED, totp(SEED, t + 60_000), t, undefined)).toBeUndefined();
    // the step already used, and any before it, are refused
    expect(verifyTotp(SEED, totp(SEED, t), t, s)).toBeUndefined();
    expect(verifyTotp(SEED, totp(SEED, t - 30_000), t, s)).toBeUndefined();
    expect(verifyTotp(SEED, totp(SEED, t + 30_000), t, s)).toBe(s + 1);
    for (const bad of ["", "12345", "1234567", "abcdef", " 123456", "12345\n"]) expect(verifyTotp(SEED, bad, t, undefined)).toBeUndefined();
  });

  it("round-trips base32 (RFC 4648 §10 vectors) and makes an otpauth URI", () => {
    expect(base32Encode(Buffer.from("foobar"))).toBe("MZXW6YTBOI");
    expect(base32Encode(Buffer.from("f"))).toBe("MY");
    expect(base32Decode("MZXW6YTBOI======").toString()).toBe("foobar");
    expect(base32Decode(base32Encode(SEED)).equals(SEED)).toBe(true);
    expect(() => base32Decode("MZ1")).toThrow();
    expect(otpauthUri(SEED, "ann")).toBe(`otpauth://totp/typevisor:ann?secret=${base32Encode(SEED)}&issuer=typevisor&algorithm=SHA1&digits=6&period=30`);
  });
});
