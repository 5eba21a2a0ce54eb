import { describe, expect, it } from "vitest";
import { AnonymousCounter, AuthThrottle, bearerToken, FREE_FAILURES, MAX_LOCKOUT_MS } from "./auth.js";

describe("failed-authentication throttle", () => {
  it("locks an address out for growing times after the free failures, and forgives a success", () => {
    let now = 1_000_000;
    const t = new AuthThrottle(() => now);
    for (let i = 0; i < FREE_FAILURES; i++) expect(t.fail("10.0.0.1")).toBe(0);
    expect(t.lockedFor("10.0.0.1")).toBe(0);
    const locks: number[] = [];
    for (let i = 0; i < 6; i++) {
      locks.push(t.fail("10.0.0.1"));
      expect(t.lockedFor("10.0.0.1")).toBe(locks.at(-1));
      now += locks.at(-1)!;
    }
    expect(locks).toEqual([1000, 2000, 4000, 8000, 16000, 32000]);
    // another address is not affected
    expect(t.lockedFor("10.0.0.2")).toBe(0);
    for (let i = 0; i < 30; i++) t.fail("10.0.0.1");
    expect(t.lockedFor("10.0.0.1")).toBe(MAX_LOCKOUT_MS);
    t.succeed("10.0.0.1");
    expect(t.lockedFor("10.0.0.1")).toBe(0);
  });

  it("forgets old failures and bounds what it tracks", () => {
    let now = 0;
    const t = new AuthThrottle(() => now);
    for (let i = 0; i < FREE_FAILURES; i++) t.fail("a");
    now += 16 * 60_000;
    expect(t.fail("a")).toBe(0);
    for (let i = 0; i < 20_000; i++) t.fail(`h${i}`);
    expect((t as unknown as { failures: Map<string, unknown> }).failures.size).toBeLessThanOrEqual(10_000);
  });
});

describe("Authorization header", () => {
  it("takes Bearer TOKEN only", () => {
    expect(bearerToken("Bearer abc")).toBe("abc");
    expect(bearerToken("bearer   tvt_x-y_z")).toBe("tvt_x-y_z");
    for (const bad of ["", "Bearer", "Bearer ", "Basic Og==", "Bearer a b", "Bearer \u00ff", "Bearerabc", "Bearer a,b"]) expect(bearerToken(bad), bad).toBeUndefined();
  });
});

describe("requests without credentials", () => {
  it("are recorded once a minute per address, the next record counting those in between", () => {
    let now = 0;
    const c = new AnonymousCounter(() => now);
    expect(c.note("a")).toEqual({ record: true, since: 0 });
    for (let i = 1; i <= 5; i++) expect(c.note("a")).toEqual({ record: false, since: i });
    expect(c.note("b")).toEqual({ record: true, since: 0 });
    now += 60_000;
    expect(c.note("a")).toEqual({ record: true, since: 5 });
    expect(c.note("a")).toEqual({ record: false, since: 1 });
  });
});
