/**
 * A snapshot state file's framing and the helpers that need no schema: what a VMM needs to
 * write a snapshot. Reading one back (state.ts decodeState) validates it with zod, a library of
 * ~7 MiB of heap and ~70 ms per isolate that loads ~80 modules (host figures,
 * docs/benchmarks.md "Density"): a VMM that boots and never restores does not load it.
 *
 *   typevisor-snapshot 1 bytes=<body length> sha256=<hex of the body>\n
 *   {...}
 */
import { createHash } from "node:crypto";
import type { SnapshotState } from "./state.js";

export const SNAPSHOT_VERSION = 1;
export const MAGIC = "typevisor-snapshot";
/** A 4096-vCPU VM's state is ~40 MiB; anything larger is not ours. */
export const MAX_STATE_BYTES = 256 * 1024 * 1024;
/** File names inside a snapshot directory. */
export const SNAPSHOT_FILES = { state: "state.json", config: "config.json", memory: "memory" } as const;
/** How many base snapshots an incremental one may stand on (each is a memory file open and mapped). */
export const MAX_SNAPSHOT_CHAIN = 32;

/** The bytes of state.json for `state`. */
export function encodeState(state: SnapshotState): Buffer {
  const body = Buffer.from(JSON.stringify(state));
  const sha = createHash("sha256").update(body).digest("hex");
  return Buffer.concat([Buffer.from(`${MAGIC} ${SNAPSHOT_VERSION} bytes=${body.length} sha256=${sha}\n`), body]);
}

/** The SHA-256 of a state file's body, from its header (what an incremental snapshot's `base.sha256` names). */
export function stateSha256(bytes: Uint8Array): string | undefined {
  const nl = Buffer.from(bytes.subarray(0, 256)).indexOf(0x0a);
  return nl < 0 ? undefined : /sha256=([0-9a-f]{64})$/.exec(Buffer.from(bytes.subarray(0, nl)).toString("latin1"))?.[1];
}

export const hex = (v: bigint): string => `0x${v.toString(16)}`;
export const b64 = (b: Uint8Array): string => Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString("base64");
export const fromB64 = (s: string): Uint8Array => new Uint8Array(Buffer.from(s, "base64"));
