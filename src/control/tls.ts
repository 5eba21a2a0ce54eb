/**
 * The HTTPS listener's certificate: the operator's (`--tls-cert/--tls-key`), or one the daemon
 * makes on its first start in `<home>/tls/` (node:crypto makes keys but not X.509 certificates, so
 * the `openssl` command does: an ECDSA P-256 key, a self-signed certificate valid for 10 years,
 * with the host's name and the listening address as subject alternative names). The key file is
 * 0600. Clients pin the certificate's SHA-256 fingerprint (`typevisor host` shows it; the daemon
 * prints it at start) or trust a CA that signed the operator's certificate.
 */
import { execFile } from "node:child_process";
import { X509Certificate } from "node:crypto";
import { chmodSync, existsSync, mkdirSync, readFileSync, renameSync, rmSync } from "node:fs";
import { hostname } from "node:os";
import { isIP } from "node:net";
import { join } from "node:path";
import { promisify } from "node:util";
import { TypevisorError } from "../errors.js";

export interface TlsMaterial {
  cert: string;
  key: string;
  /** SHA-256 of the DER certificate, colon-separated upper-case hex (as `openssl x509 -fingerprint -sha256` prints it). */
  fingerprint: string;
  certPath: string;
  keyPath: string;
  generated: boolean;
}

export function fingerprintOf(certPem: string): string {
  return new X509Certificate(certPem).fingerprint256;
}

/** `AB:CD:...` or `abcd...`, as a user may paste it: the canonical form, or undefined if it is not a SHA-256. */
export function normalizeFingerprint(v: string): string | undefined {
  const hex = v.replace(/[:\s]/g, "").toUpperCase();
  if (!/^[0-9A-F]{64}$/.test(hex)) return undefined;
  return hex.match(/../g)!.join(":");
}

function load(certPath: string, keyPath: string, generated: boolean): TlsMaterial {
  let cert: string;
  let key: string;
  try {
    cert = readFileSync(certPath, "utf8");
    key = readFileSync(keyPath, "utf8");
  } catch (e) {
    throw new TypevisorError("TLS", `cannot read the TLS certificate or key: ${(e as Error).message}`);
  }
  let fingerprint: string;
  try {
    fingerprint = fingerprintOf(cert);
  } catch (e) {
    throw new TypevisorError("TLS", `${certPath} is not a PEM certificate: ${(e as Error).message}`);
  }
  return { cert, key, fingerprint, certPath, keyPath, generated };
}

/** The operator's certificate and key, as given. */
export function loadTls(certPath: string, keyPath: string): TlsMaterial {
  return load(certPath, keyPath, false);
}

/** `<home>/tls/{cert,key}.pem`, made now if they are not there. */
export async function ensureSelfSigned(home: string, listenHost: string): Promise<TlsMaterial> {
  const dir = join(home, "tls");
  const certPath = join(dir, "cert.pem");
  const keyPath = join(dir, "key.pem");
  if (existsSync(certPath) && existsSync(keyPath)) return load(certPath, keyPath, false);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const names = new Set(["localhost", hostname(), listenHost].filter((n) => n !== "" && n !== "0.0.0.0" && n !== "::"));
  const san = [...names].map((n) => (isIP(n) !== 0 ? `IP:${n}` : `DNS:${n}`)).concat(["IP:127.0.0.1", "IP:::1"]);
  const tmpKey = `${keyPath}.new`;
  const tmpCert = `${certPath}.new`;
  try {
    await promisify(execFile)(
      "openssl",
      ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "3650", "-subj", `/CN=typevisor ${hostname()}`, "-addext", `subjectAltName=${[...new Set(san)].join(",")}`, "-keyout", tmpKey, "-out", tmpCert],
      { timeout: 60_000 },
    );
  } catch (e) {
    rmSync(tmpKey, { force: true });
    rmSync(tmpCert, { force: true });
    const missing = (e as NodeJS.ErrnoException).code === "ENOENT";
    throw new TypevisorError("TLS", missing ? "the openssl command is needed to make a certificate (apt-get install openssl), or give --tls-cert and --tls-key" : `openssl could not make a certificate: ${(e as Error).message}`);
  }
  // the daemon's umask made it 0600 already; a key is never looser, whatever the umask was
  chmodSync(tmpKey, 0o600);
  renameSync(tmpKey, keyPath);
  renameSync(tmpCert, certPath);
  return load(certPath, keyPath, true);
}
