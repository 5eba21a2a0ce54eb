/**
 * One-time passwords for multi-factor login (docs/security.md), with node:crypto only.
 *
 * - HOTP, RFC 4226 §5.3: HMAC-SHA1(secret, 8-byte big-endian counter), dynamic truncation (the low
 *   nibble of the last byte is an offset; the 31 bits there, modulo 10^digits).
 * - TOTP, RFC 6238 §4: HOTP with the counter T = floor((unix time - T0) / X), T0 = 0, X = 30 s;
 *   6 digits, SHA-1 (what authenticator apps take by default from an otpauth:// URI).
 * - A code is accepted for the current step and one step either side (RFC 6238 §5.2 recommends at
 *   most one step of network delay / clock drift), and only for a step later than the last one
 *   accepted for that user, so a code seen once (over a shoulder, in a proxy's log) cannot be
 *   replayed (RFC 6238 §5.2: "the verifier MUST NOT accept the second attempt of the same OTP").
 * - The secret is 20 random bytes (160 bits, RFC 4226 §4 R6 recommends 160), shown base32 (RFC
 *   4648 §6, unpadded) in the otpauth:// URI authenticator apps read.
 */
import { createHmac, randomBytes, timingSafeEqual } from "node:crypto";

export const TOTP_STEP_S = 30;
export const TOTP_DIGITS = 6;
/** Steps accepted either side of the current one. */
export const TOTP_WINDOW = 1;

const B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/** RFC 4648 §6 base32, without padding (as otpauth URIs carry it). */
export function base32Encode(b: Buffer): string {
  let out = "";
  let bits = 0;
  let value = 0;
  for (const byte of b) {
    value = (value << 8) | byte;
    bits += 8;
    while (bits >= 5) {
      out += B32[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
  }
  if (bits > 0) out += B32[(value << (5 - bits)) & 31];
  return out;
}

/** @throws Error on a character outside the alphabet */
export function base32Decode(s: string): Buffer {
  const clean = s.replace(/=+$/, "").toUpperCase();
  const out: number[] = [];
  let bits = 0;
  let value = 0;
  for (const c of clean) {
    const i = B32.indexOf(c);
    if (i < 0) throw new Error(`not base32: ${JSON.stringify(c)}`);
    value = ((value << 5) | i) & 0xffff;
    bits += 5;
    if (bits >= 8) {
      out.push((value >>> (bits - 8)) & 0xff);
      bits -= 8;
    }
  }
  return Buffer.from(out);
}

/** RFC 4226 §5.3: the HOTP value of `counter`, `digits` long (zero-padded). */
export function hotp(secret: Buffer, counter: number, digits = TOTP_DIGITS): string {
  const msg = Buffer.alloc(8);
  msg.writeBigUInt64BE(BigInt(counter));
  const h = createHmac("sha1", secret).update(msg).digest();
  const offset = h[h.length - 1]! & 0x0f;
  const bin = ((h[offset]! & 0x7f) << 24) | (h[offset + 1]! << 16) | (h[offset + 2]! << 8) | h[offset + 3]!;
  return String(bin % 10 ** digits).padStart(digits, "0");
}

/** RFC 6238 §4.2: the time step of `unixMs`. */
export function totpStep(unixMs: number): number {
  return Math.floor(unixMs / 1000 / TOTP_STEP_S);
}

export function totp(secret: Buffer, unixMs: number, digits = TOTP_DIGITS): string {
  return hotp(secret, totpStep(unixMs), digits);
}

/**
 * The step `code` matches, within the window and after `lastStep` (the last one accepted: a
 * replay, or an older code, is refused), or undefined.
 */
export function verifyTotp(secret: Buffer, code: string, unixMs: number, lastStep: number | undefined): number | undefined {
  if (!/^\d{6}$/.test(code)) return undefined;
  const now = totpStep(unixMs);
  let hit: number | undefined;
  // every candidate is computed and compared in constant time: the answer's timing says nothing of which step matched
  for (let s = now - TOTP_WINDOW; s <= now + TOTP_WINDOW; s++) {
    const ok = timingSafeEqual(Buffer.from(hotp(secret, s)), Buffer.from(code));
    if (ok && hit === undefined && (lastStep === undefined || s > lastStep)) hit = s;
  }
  return hit;
}

export function newTotpSecret(): Buffer {
  return randomBytes(20);
}

/** The Key Uri Format authenticator apps read (otpauth://totp/ISSUER:ACCOUNT?secret=...&issuer=...). */
export function otpauthUri(secret: Buffer, account: string, issuer = "typevisor"): string {
  const label = `${encodeURIComponent(issuer)}:${encodeURIComponent(account)}`;
  return `otpauth://totp/${label}?secret=${base32Encode(secret)}&issuer=${encodeURIComponent(issuer)}&algorithm=SHA1&digits=${TOTP_DIGITS}&period=${TOTP_STEP_S}`;
}
