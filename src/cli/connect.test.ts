import { mkdtempSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { readSessions, requestTimeoutMs, resolveToken, saveSession, sessionFile } from "./connect.js";

describe("the token the CLI sends", () => {
  it("is --token-file, else $TYPEVISOR_TOKEN, else the session saved for that very --host", () => {
    const dir = mkdtempSync(join(tmpdir(), "tvconn-"));
    const env = { XDG_CONFIG_HOME: join(dir, "cfg") };
    const file = saveSession("10.0.0.1:8420", { token: "tvt_session", user: "ann", expiresAt: "2030-01-01T00:00:00Z" }, env);
    expect(file).toBe(sessionFile(env));
    expect(statSync(file).mode & 0o777).toBe(0o600);
    expect(statSync(join(dir, "cfg", "typevisor")).mode & 0o777).toBe(0o700);
    expect(resolveToken({ host: "10.0.0.1:8420" }, env)).toBe("tvt_session");
    // only to the host that issued it: not another, not the unix socket
    expect(resolveToken({ host: "10.0.0.2:8420" }, env)).toBeUndefined();
    expect(resolveToken({ host: "10.0.0.1:8421" }, env)).toBeUndefined();
    expect(resolveToken({}, env)).toBeUndefined();
    expect(resolveToken({ host: "10.0.0.1:8420" }, { ...env, TYPEVISOR_TOKEN: "tvt_env" })).toBe("tvt_env");
    const tf = join(dir, "token");
    writeFileSync(tf, "tvt_file\n");
    expect(resolveToken({ host: "10.0.0.1:8420", tokenFile: tf }, { ...env, TYPEVISOR_TOKEN: "tvt_env" })).toBe("tvt_file");
    // forgetting one keeps the others; a mangled file is no session
    saveSession("[::1]:8420", { token: "tvt_v6", user: "ann", expiresAt: "x" }, env);
    expect(resolveToken({ host: "[::1]:8420" }, env)).toBe("tvt_v6");
    saveSession("10.0.0.1:8420", undefined, env);
    expect(Object.keys(readSessions(env))).toEqual(["[::1]:8420"]);
    writeFileSync(file, "[1,2");
    expect(resolveToken({ host: "[::1]:8420" }, env)).toBeUndefined();
    writeFileSync(file, JSON.stringify({ "[::1]:8420": { token: 42 } }));
    expect(resolveToken({ host: "[::1]:8420" }, env)).toBeUndefined();
    expect(readFileSync(file, "utf8")).toContain("42");
  });

  it("waits $TYPEVISOR_TIMEOUT seconds for an answer, 120 by default, and refuses anything but whole seconds", () => {
    expect(requestTimeoutMs({})).toBe(120_000);
    expect(requestTimeoutMs({ TYPEVISOR_TIMEOUT: "" })).toBe(120_000);
    expect(requestTimeoutMs({ TYPEVISOR_TIMEOUT: "420" })).toBe(420_000);
    for (const bad of ["0", "-5", "1.5", "2m", "86401", "1e3"]) expect(() => requestTimeoutMs({ TYPEVISOR_TIMEOUT: bad }), bad).toThrow(/TYPEVISOR_TIMEOUT/);
  });
});
