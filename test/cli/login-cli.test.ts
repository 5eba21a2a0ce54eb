/**
 * `typevisor user mfa`, `typevisor login` and `logout`, end to end: the real CLI from dist/ against a
 * real daemon over HTTPS (fingerprint pinned), as root on the unix socket for the setup. The TOTP
 * code is computed here from the secret the CLI printed.
 */
import { existsSync, mkdtempSync, readFileSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { base32Decode, totp } from "../../src/control/totp.js";
import { runCli, type Run } from "../helpers/cli.js";
import { startDaemon, tcpPort, type TestDaemon } from "../helpers/daemon.js";

const isRoot = process.getuid?.() === 0;


describe.skipIf(!isRoot)("typevisor login with MFA over HTTPS", () => {
  let d: TestDaemon;
  let host: string;
  let fp: string;
  const config = mkdtempSync(join(tmpdir(), "tvcfg-"));

  /** The CLI; over HTTPS unless `socket` (then as root on the daemon's unix socket). */
  function tv(args: string[], opts: { input?: string; env?: Record<string, string>; socket?: boolean } = {}): Promise<Run> {
    const where = opts.socket === true ? ["--home", d.home] : ["--host", host];
    return runCli([...args, ...where], {
      env: { XDG_CONFIG_HOME: config, TYPEVISOR_FINGERPRINT: fp, TYPEVISOR_TOKEN: undefined, ...opts.env },
      ...(opts.input !== undefined ? { input: opts.input } : {}),
    });
  }

  beforeAll(async () => {
    d = await startDaemon({ args: ["--listen", "127.0.0.1:0"] });
    host = `127.0.0.1:${await tcpPort(d)}`;
    fp = (await d.client.host()).tls!.fingerprint;
  }, 30_000);

  afterAll(async () => {
    await d?.stop();
  });

  it("enables MFA, logs an admin in with a TOTP code, uses and ends the saved session", async () => {
    expect((await tv(["user", "add", "ann", "--role", "admin", "--password-stdin"], { input: "ann's password\n", socket: true })).status).toBe(0);
    // an admin without MFA: refused, saying what to do
    const refused = await tv(["login", "--user", "ann", "--password-stdin"], { input: "ann's password\n" });
    expect(refused.status).toBe(6);
    expect(refused.stderr).toMatch(/error\[MFA_REQUIRED\].*needs MFA/);
    expect(refused.stderr).toMatch(/typevisor user mfa enable ann/);

    const en = await tv(["user", "mfa", "enable", "ann"], { socket: true });
    expect(en.status, en.stderr).toBe(0);
    const uri = /^otpauth:\/\/totp\/typevisor:ann\?secret=([A-Z2-7]+)&issuer=typevisor&\S*$/m.exec(en.stdout);
    expect(uri, en.stdout).not.toBeNull();
    expect(en.stdout.match(/^ {2}[a-z2-7]{4}-[a-z2-7]{4}-[a-z2-7]{4}-[a-z2-7]{4}$/gm)).toHaveLength(10);
    expect((await tv(["user", "ls"], { socket: true })).stdout).toMatch(/\nann\s+admin\s+all VMs\s+set\s+on\s+/);
    const secret = base32Decode(uri![1]!);

    // no code and no terminal to ask for one: refused
    const nocode = await tv(["login", "--user", "ann", "--password-stdin"], { input: "ann's password\n" });
    expect(nocode.status).toBe(6);
    expect(nocode.stderr).toMatch(/MFA on/);
    const ok = await tv(["login", "--user", "ann", "--password-stdin", "--totp", totp(secret, Date.now())], { input: "ann's password\n" });
    expect(ok.status, ok.stderr).toBe(0);
    expect(ok.stdout).toMatch(new RegExp(`^logged in to ${host} as ann \\(admin\\) until `));
    const file = join(config, "typevisor", "sessions.json");
    expect(statSync(file).mode & 0o777).toBe(0o600);
    const saved = JSON.parse(readFileSync(file, "utf8")) as Record<string, { token: string }>;
    expect(saved[host]?.token).toMatch(/^tvt_/);

    // later commands to that host use it
    expect(await tv(["user", "ls"])).toMatchObject({ status: 0, stdout: expect.stringMatching(/\nann\s+admin/) });
    // TYPEVISOR_TOKEN wins over the saved session
    const viewer = await d.client.addUser({ name: "vic", role: "viewer" }).then(() => d.client.createToken({ user: "vic" }));
    expect((await tv(["user", "ls"], { env: { TYPEVISOR_TOKEN: viewer.token } })).status).toBe(6);

    expect(await tv(["logout"])).toMatchObject({ status: 0, stdout: `logged out of ${host}\n` });
    expect((JSON.parse(readFileSync(file, "utf8")) as Record<string, unknown>)[host]).toBeUndefined();
    // the session is revoked on the daemon, not only forgotten here
    const tokens = await d.client.listTokens({ user: "ann" });
    expect(tokens.filter((t) => t.session === true).every((t) => t.revokedAt !== undefined)).toBe(true);
    expect((await tv(["token", "ls", "--user", "ann"], { socket: true })).stdout).toMatch(/\n[0-9a-f]{12}\s+session\s+ann\s+admin\s+.*revoked/);
    expect((await tv(["user", "ls"])).status).toBe(6);

    expect(await tv(["user", "mfa", "disable", "ann"], { socket: true })).toMatchObject({ status: 0, stdout: "ann: MFA off\n" });
    expect((await tv(["user", "ls"], { socket: true })).stdout).toMatch(/\nann\s+admin\s+all VMs\s+set\s+off\s+/);
  }, 120_000);

  it("wants --host for login, and says so", async () => {
    const r = await tv(["login", "--user", "ann", "--password-stdin"], { input: "x\n", socket: true });
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/--host/);
    expect(existsSync(join(config, "typevisor", "sessions.json"))).toBe(true);
  });
});
