/**
 * One-time TLS credentials for one migration stream (docs/migration.md, "Between daemons"): each
 * daemon makes a fresh key and self-signed certificate for its VMM's end of the stream, and the
 * two daemons exchange the certificates' fingerprints over their authenticated API connection.
 * The VMMs then pin each other's fingerprint (vmm/migration/transport.ts): nobody else can be
 * either end, and the credentials are worth nothing after this one migration.
 *
 * node:crypto makes keys but not X.509 certificates: the `openssl` command does (as tls.ts).
 */
import { execFile } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { TypevisorError } from "../errors.js";
import { fingerprintOf } from "./tls.js";

export interface OneTimeCert {
  cert: string;
  key: string;
  fingerprint: string;
}

export async function oneTimeCertificate(commonName: string): Promise<OneTimeCert> {
  // A private directory for the moment the key is a file (openssl writes it 0600 itself).
  const dir = mkdtempSync(join(tmpdir(), "tv-migtls-"));
  try {
    await promisify(execFile)(
      "openssl",
      ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", `/CN=${commonName.replace(/[^A-Za-z0-9 ._-]/g, "-")}`, "-keyout", join(dir, "key.pem"), "-out", join(dir, "cert.pem")],
      { timeout: 60_000 },
    );
    const cert = readFileSync(join(dir, "cert.pem"), "utf8");
    return { cert, key: readFileSync(join(dir, "key.pem"), "utf8"), fingerprint: fingerprintOf(cert) };
  } catch (e) {
    throw new TypevisorError("TLS", `cannot make a certificate for the migration stream (openssl): ${(e as Error).message}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
