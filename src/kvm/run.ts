/**
 * A typed view over the vCPU's mmapped `struct kvm_run` (linux/kvm.h). Field
 * offsets are x86_64. The union after offset 32 is decoded per exit reason.
 */
import { EXIT } from "./ioctls.js";

const OFF = {
  immediateExit: 1,
  exitReason: 8,
  union: 32,
} as const;

export type VmExit =
  | { kind: "io"; out: boolean; size: number; port: number; count: number; dataOffset: number }
  | { kind: "mmio"; addr: number; len: number; write: boolean }
  | { kind: "shutdown" }
  | { kind: "hlt" }
  | { kind: "fail_entry"; reason: bigint; cpu: number }
  | { kind: "internal_error"; suberror: number; data: bigint[] }
  | { kind: "system_event"; type: number }
  | { kind: "intr" }
  | { kind: "other"; reason: number };

export class KvmRun {
  readonly bytes: Uint8Array;
  readonly dv: DataView;

  constructor(buffer: ArrayBuffer) {
    this.bytes = new Uint8Array(buffer);
    this.dv = new DataView(buffer);
  }

  get exitReason(): number {
    return this.dv.getUint32(OFF.exitReason, true);
  }

  set immediateExit(v: number) {
    this.bytes[OFF.immediateExit] = v;
  }

  get immediateExit(): number {
    return this.bytes[OFF.immediateExit] ?? 0;
  }

  decode(): VmExit {
    const u = OFF.union;
    const dv = this.dv;
    switch (this.exitReason) {
      case EXIT.IO:
        return {
          kind: "io",
          out: dv.getUint8(u) === 1,
          size: dv.getUint8(u + 1),
          port: dv.getUint16(u + 2, true),
          count: dv.getUint32(u + 4, true),
          dataOffset: Number(dv.getBigUint64(u + 8, true)),
        };
      case EXIT.MMIO:
        return {
          kind: "mmio",
          addr: Number(dv.getBigUint64(u, true)),
          len: dv.getUint32(u + 16, true),
          write: dv.getUint8(u + 20) !== 0,
        };
      case EXIT.SHUTDOWN:
        return { kind: "shutdown" };
      case EXIT.HLT:
        return { kind: "hlt" };
      case EXIT.FAIL_ENTRY:
        return { kind: "fail_entry", reason: dv.getBigUint64(u, true), cpu: dv.getUint32(u + 8, true) };
      case EXIT.INTERNAL_ERROR: {
        const ndata = Math.min(dv.getUint32(u + 4, true), 16);
        const data: bigint[] = [];
        for (let i = 0; i < ndata; i++) data.push(dv.getBigUint64(u + 8 + i * 8, true));
        return { kind: "internal_error", suberror: dv.getUint32(u, true), data };
      }
      case EXIT.SYSTEM_EVENT:
        return { kind: "system_event", type: dv.getUint32(u, true) };
      case EXIT.INTR:
        return { kind: "intr" };
      default:
        return { kind: "other", reason: this.exitReason };
    }
  }

  /** The 8-byte data buffer of an MMIO exit (kvm_run.mmio.data). */
  mmioData(): Uint8Array {
    return this.bytes.subarray(OFF.union + 8, OFF.union + 16);
  }
}
