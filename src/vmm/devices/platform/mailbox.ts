/**
 * A synchronous call from a vCPU thread to the device thread, for the rare
 * exits that need device state living there (PCI configuration, BAR
 * registers). One slot of Int32s per vCPU in a SharedArrayBuffer: the vCPU
 * fills its slot, signals the device thread's eventfd and sleeps in
 * Atomics.wait until the slot says done. Queue notifications do not come this
 * way: they use ioeventfds and never wait.
 */
import * as libc from "../../../sys/libc.js";

const SLOT = 8;
const STATE = 0;
const OP = 1;
const SIZE = 2;
const ADDR_LO = 3;
const ADDR_HI = 4;
const DATA_LO = 5;
const DATA_HI = 6;

const IDLE = 0;
const REQUEST = 1;
const DONE = 2;

export const Op = { MMIO_READ: 0, MMIO_WRITE: 1, PIO_READ: 2, PIO_WRITE: 3 } as const;
export type OpCode = (typeof Op)[keyof typeof Op];

export interface MailboxHandler {
  /** Returns the value read (reads) or 0 (writes). Must not throw. */
  handle(op: OpCode, addr: number, size: number, data: bigint): bigint;
}

export function createMailbox(vcpus: number): SharedArrayBuffer {
  return new SharedArrayBuffer(vcpus * SLOT * 4);
}

/** How long a vCPU waits for the device thread before giving up on one access. */
const TIMEOUT_MS = 10_000;

export class MailboxClient {
  private readonly s: Int32Array;
  private readonly base: number;

  constructor(shared: SharedArrayBuffer, vcpuId: number, private readonly eventfd: number) {
    this.s = new Int32Array(shared);
    this.base = vcpuId * SLOT;
  }

  /** Perform one access on the device thread; all ones if it does not answer (a dead bus). */
  call(op: OpCode, addr: number, size: number, data: bigint): bigint {
    const s = this.s;
    const b = this.base;
    s[b + OP] = op;
    s[b + SIZE] = size;
    s[b + ADDR_LO] = addr >>> 0;
    s[b + ADDR_HI] = Math.floor(addr / 0x1_0000_0000);
    s[b + DATA_LO] = Number(data & 0xffff_ffffn) | 0;
    s[b + DATA_HI] = Number((data >> 32n) & 0xffff_ffffn) | 0;
    Atomics.store(s, b + STATE, REQUEST);
    libc.eventfdSignal(this.eventfd);
    const deadline = Date.now() + TIMEOUT_MS;
    while (Atomics.load(s, b + STATE) === REQUEST) {
      Atomics.wait(s, b + STATE, REQUEST, 100);
      if (Date.now() > deadline) {
        Atomics.store(s, b + STATE, IDLE);
        return (1n << BigInt(size * 8)) - 1n;
      }
    }
    const v = (BigInt(s[b + DATA_HI]! >>> 0) << 32n) | BigInt(s[b + DATA_LO]! >>> 0);
    Atomics.store(s, b + STATE, IDLE);
    return v;
  }
}

export class MailboxServer {
  private readonly s: Int32Array;

  constructor(shared: SharedArrayBuffer, private readonly vcpus: number) {
    this.s = new Int32Array(shared);
  }

  /** Serve every pending request; call when the mailbox eventfd fires. */
  serve(handler: MailboxHandler): number {
    const s = this.s;
    let served = 0;
    for (let v = 0; v < this.vcpus; v++) {
      const b = v * SLOT;
      if (Atomics.load(s, b + STATE) !== REQUEST) continue;
      const op = s[b + OP]! as OpCode;
      const size = s[b + SIZE]!;
      const addr = (s[b + ADDR_HI]! >>> 0) * 0x1_0000_0000 + (s[b + ADDR_LO]! >>> 0);
      const data = (BigInt(s[b + DATA_HI]! >>> 0) << 32n) | BigInt(s[b + DATA_LO]! >>> 0);
      let result = 0n;
      try {
        result = handler.handle(op, addr, size, data);
      } catch {
        result = op === Op.MMIO_READ || op === Op.PIO_READ ? (1n << BigInt(size * 8)) - 1n : 0n;
      }
      s[b + DATA_LO] = Number(result & 0xffff_ffffn) | 0;
      s[b + DATA_HI] = Number((result >> 32n) & 0xffff_ffffn) | 0;
      Atomics.store(s, b + STATE, DONE);
      Atomics.notify(s, b + STATE);
      served++;
    }
    return served;
  }
}
