/**
 * How the migration stream's connection is made: plain (a unix socket, or TCP when asked for
 * explicitly) or TLS with mutual authentication (node:tls, RFC 8446), for both the source
 * (connect) and the destination (accept one authenticated peer).
 *
 * Both sides hold a certificate and its key and know how to recognise the other: a pinned
 * SHA-256 fingerprint of the peer's certificate (what the daemons use: one-time self-signed
 * certificates, docs/migration.md) or a CA the peer's certificate must chain to. The
 * destination asks for the client's certificate (RFC 8446 §4.3.2, CertificateRequest) and checks
 * it on the finished handshake, before it reads a byte of the stream: a peer without the right
 * certificate is cut off there and the destination waits on for the right one (a port scanner
 * must not end an incoming VM). The source checks the destination's certificate the same way
 * before it sends HELLO: a wrong destination gets nothing of the guest.
 *
 * With a CA, the peer's name is not checked (the migration endpoints are addresses, and the CA is
 * expected to be one for migration peers only); pin fingerprints to name one exact peer.
 */
import { X509Certificate } from "node:crypto";
import { existsSync, readFileSync, unlinkSync } from "node:fs";
import { connect, createServer, type Server, type Socket } from "node:net";
import { connect as tlsConnect, createServer as createTlsServer, type TLSSocket } from "node:tls";
import { TypevisorError } from "../../errors.js";

/** PEM texts and the peer's pin: what both ends of a TLS stream are given. */
export interface StreamTls {
  /** This side's certificate (PEM). */
  cert: string;
  /** Its private key (PEM). */
  key: string;
  /** PEM CA certificate(s) the peer's certificate must chain to. */
  ca?: string;
  /** The peer certificate's SHA-256 fingerprint (hex, colons optional). */
  peerFingerprint?: string;
}

/** The longest PEM text taken (a certificate chain or key: far less in practice). */
export const PEM_MAX = 64 * 1024;

/** How a stream is secured: TLS, or plain; TCP in plain only when the caller said so (`plainTcp`). */
export interface StreamSecurity {
  tls?: StreamTls;
  plainTcp?: boolean;
}

/** `AB:CD:...` or `abcd...`: the canonical colon-separated upper-case form, or undefined. */
export function canonicalFingerprint(v: string): string | undefined {
  const hex = v.replace(/[:\s]/g, "").toUpperCase();
  return /^[0-9A-F]{64}$/.test(hex) ? hex.match(/../g)!.join(":") : undefined;
}

/** Check what a caller gave before anything listens or connects: a bad PEM or pin is a clear error, not a failed handshake later. */
export function checkStreamTls(t: StreamTls): StreamTls {
  try {
    new X509Certificate(t.cert);
  } catch (e) {
    throw new TypevisorError("INVALID_REQUEST", `the migration TLS certificate is not a PEM certificate: ${(e as Error).message}`);
  }
  if (!/-----BEGIN [A-Z ]*PRIVATE KEY-----/.test(t.key)) throw new TypevisorError("INVALID_REQUEST", "the migration TLS key is not a PEM private key");
  if (t.peerFingerprint === undefined && t.ca === undefined) {
    throw new TypevisorError("INVALID_REQUEST", "a TLS migration stream needs the peer's certificate fingerprint or a CA to check it against: both sides authenticate each other");
  }
  if (t.peerFingerprint !== undefined && canonicalFingerprint(t.peerFingerprint) === undefined) {
    throw new TypevisorError("INVALID_REQUEST", `a fingerprint is the SHA-256 of the peer's certificate, 64 hex digits (got "${t.peerFingerprint.slice(0, 100)}")`);
  }
  if (t.ca !== undefined) {
    try {
      new X509Certificate(t.ca);
    } catch (e) {
      throw new TypevisorError("INVALID_REQUEST", `the migration TLS CA is not a PEM certificate: ${(e as Error).message}`);
    }
  }
  return t;
}

/** The `run --incoming` flags' files read into a StreamTls (the key file should be 0600: the caller's business). */
export function streamTlsFromFiles(f: { cert?: string; key?: string; ca?: string; peerFingerprint?: string }): StreamTls | undefined {
  if (f.cert === undefined && f.key === undefined && f.ca === undefined && f.peerFingerprint === undefined) return undefined;
  if (f.cert === undefined || f.key === undefined) throw new TypevisorError("INVALID_ARGUMENT", "TLS for the migration stream needs both --tls-cert and --tls-key");
  const read = (flag: string, path: string): string => {
    try {
      return readFileSync(path, "utf8").slice(0, PEM_MAX + 1);
    } catch (e) {
      throw new TypevisorError("INVALID_ARGUMENT", `${flag} ${path}: ${(e as Error).message}`);
    }
  };
  return checkStreamTls({
    cert: read("--tls-cert", f.cert),
    key: read("--tls-key", f.key),
    ...(f.ca !== undefined ? { ca: read("--tls-ca", f.ca) } : {}),
    ...(f.peerFingerprint !== undefined ? { peerFingerprint: f.peerFingerprint } : {}),
  });
}

type Endpoint = { path: string } | { host: string; port: number };

export function parseEndpoint(spec: string): Endpoint {
  if (spec.startsWith("unix:") && spec.length > 5) return { path: spec.slice(5) };
  const m = /^tcp:(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/.exec(spec);
  if (m !== null && Number(m[2]) > 0 && Number(m[2]) < 65536) return { host: m[1]!.replace(/^\[|\]$/g, ""), port: Number(m[2]) };
  throw new TypevisorError("INVALID_REQUEST", `migration endpoint "${spec}": give tcp:HOST:PORT or unix:PATH`);
}

/** The endpoint, refused when it would carry a guest's memory over TCP in the clear without being asked to. */
export function checkedEndpoint(spec: string, sec: StreamSecurity): Endpoint {
  const ep = parseEndpoint(spec);
  if (sec.tls !== undefined) checkStreamTls(sec.tls);
  else if ("host" in ep && sec.plainTcp !== true) {
    throw new TypevisorError("INVALID_REQUEST", `a migration over TCP (${spec}) carries the guest's memory: give TLS credentials (a certificate, its key, and the peer's fingerprint or CA), or ask for plain TCP explicitly`, {
      hint: "run --incoming: --tls-cert/--tls-key/--tls-peer-fingerprint or --plain-tcp; POST /migrate: \"tls\": {...} or \"plainTcp\": true",
    });
  }
  return ep;
}

/** Why `sock`'s peer is not the one expected, or undefined when it is (after a finished handshake). */
function peerProblem(sock: TLSSocket, t: StreamTls): string | undefined {
  const cert = sock.getPeerCertificate();
  if (cert === null || Object.keys(cert).length === 0) return "the peer presented no certificate";
  if (t.peerFingerprint !== undefined) {
    const want = canonicalFingerprint(t.peerFingerprint);
    if (cert.fingerprint256 !== want) return `the peer's certificate has fingerprint ${cert.fingerprint256}, not the expected ${want}`;
    return undefined;
  }
  if (!sock.authorized) return `the peer's certificate is not signed by the given CA (${String(sock.authorizationError)})`;
  return undefined;
}

/** TLS options of both ends: verification by CA is node's; by pin, ours (a self-signed certificate has no chain). */
function tlsOptions(t: StreamTls): { cert: string; key: string; ca?: string; rejectUnauthorized: boolean; minVersion: "TLSv1.3" } {
  return { cert: t.cert, key: t.key, ...(t.ca !== undefined ? { ca: t.ca } : {}), rejectUnauthorized: t.peerFingerprint === undefined, minVersion: "TLSv1.3" };
}

/**
 * No Nagle on the source's TCP connection: what it writes is frames whose last segment is short
 * (a frame's tail, a SYNC, the state's last piece), and Nagle holds such a segment until the
 * destination acknowledges the data before it, which Linux may delay by up to 40 ms (delayed ACK).
 * (A unix socket has no Nagle: setNoDelay does nothing there.)
 */
function noDelay(sock: Socket): void {
  sock.setNoDelay(true);
}

/**
 * The source's connection, its peer checked. `onSocket` gets the socket as soon as there is one
 * (a cancel destroys it while connecting).
 */
export function openStream(spec: string, sec: StreamSecurity, onSocket: (s: Socket) => void): Promise<Socket> {
  const ep = checkedEndpoint(spec, sec);
  return new Promise((resolve, reject) => {
    const fail = (e: Error): void => reject(e instanceof TypevisorError ? e : new TypevisorError("MIGRATION_PEER", `cannot reach ${spec}: ${e.message}`));
    const t = sec.tls;
    if (t === undefined) {
      const sock = "path" in ep ? connect(ep.path) : connect(ep.port, ep.host);
      onSocket(sock);
      sock.once("connect", () => {
        noDelay(sock);
        sock.off("error", fail);
        sock.on("error", () => undefined); // reported by the reader
        resolve(sock);
      });
      sock.once("error", fail);
      return;
    }
    const sock = tlsConnect({
      ...("path" in ep ? { path: ep.path } : { host: ep.host, port: ep.port }),
      ...tlsOptions(t),
      // The destination is an address: its certificate's name is not what authenticates it (see the header).
      checkServerIdentity: () => undefined,
    });
    onSocket(sock);
    sock.once("secureConnect", () => {
      const why = peerProblem(sock, t);
      if (why !== undefined) {
        sock.destroy();
        reject(new TypevisorError("MIGRATION_AUTH", `the destination ${spec} is not the expected peer: ${why}; nothing was sent`));
        return;
      }
      noDelay(sock);
      sock.off("error", fail);
      sock.on("error", () => undefined); // reported by the reader
      resolve(sock);
    });
    sock.once("error", (e) => fail(new TypevisorError("MIGRATION_AUTH", `TLS with ${spec} failed: ${e.message}; nothing was sent`)));
  });
}

/**
 * The destination's listener for one stream: `listening` once bound, `accepted` with the first
 * connection whose peer is the expected one (TLS: authenticated; plain: the first to connect; a
 * plain socket paused, not a byte read: read-into.ts frameReaderFor takes it from there),
 * `close()` to give up waiting. Refused TLS peers are logged and cut off before anything of
 * theirs is read; the listener then goes on waiting.
 */
export interface StreamListener {
  listening: Promise<void>;
  accepted: Promise<Socket>;
  close(): void;
}

export function listenStream(spec: string, sec: StreamSecurity, log: (line: string) => void): StreamListener {
  const ep = checkedEndpoint(spec, sec);
  const t = sec.tls;
  let server: Server;
  let onListening: () => void = () => undefined;
  let onError: (e: Error) => void = () => undefined;
  const listening = new Promise<void>((res, rej) => {
    onListening = res;
    onError = rej;
  });
  listening.catch(() => undefined);
  const accepted = new Promise<Socket>((resolve, reject) => {
    const take = (sock: Socket): void => {
      server.close();
      resolve(sock);
    };
    // Plain: accepted without reading a byte, so its handle can move to a socket that reads into place (read-into.ts).
    if (t === undefined) server = createServer({ pauseOnConnect: true }, take);
    else {
      server = createTlsServer({ ...tlsOptions(t), requestCert: true }, (sock: TLSSocket) => {
        const why = peerProblem(sock, t);
        if (why !== undefined) {
          log(`typevisor: refused a migration connection from ${sock.remoteAddress ?? "a unix socket peer"}: ${why}`);
          sock.destroy();
          return;
        }
        take(sock);
      });
      // A failed handshake (no certificate where the CA requires one, a protocol mismatch): that peer only.
      server.on("tlsClientError", (e, sock) => {
        log(`typevisor: refused a migration connection from ${sock.remoteAddress ?? "a unix socket peer"}: ${e.message}`);
        sock.destroy();
      });
    }
    server.once("error", (e) => {
      const err = new TypevisorError("MIGRATION_LISTEN", `cannot listen on ${spec}: ${e.message}`);
      onError(err);
      reject(err);
    });
    server.once("close", () => reject(new TypevisorError("MIGRATION_LISTEN", `stopped listening on ${spec} before a peer came`)));
    const how = t !== undefined ? " (TLS, the peer authenticated)" : "";
    if ("path" in ep) {
      if (existsSync(ep.path)) unlinkSync(ep.path);
      server.listen(ep.path, () => {
        log(`typevisor: waiting for a migration on ${spec}${how}`);
        onListening();
      });
    } else {
      server.listen(ep.port, ep.host, () => {
        // The port actually bound (tcp:ADDR:0 asks the kernel for one): what a caller hands the source.
        const a = server.address();
        const port = typeof a === "object" && a !== null ? a.port : ep.port;
        log(`typevisor: waiting for a migration on tcp:${ep.host.includes(":") ? `[${ep.host}]` : ep.host}:${port}${how}`);
        onListening();
      });
    }
  });
  accepted.catch(() => undefined);
  return { listening, accepted, close: () => server.close() };
}
