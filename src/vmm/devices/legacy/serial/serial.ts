/**
 * 16550A UART (National Semiconductor PC16550D datasheet: register map,
 * IIR priorities, FIFO control; loopback per MCR bit 4).
 *
 * The state lives in a SharedArrayBuffer so every vCPU thread can serve the
 * port directly (no round trip to the main thread per character) and the main
 * thread can feed console input. All register logic runs under one lock.
 * Transmit is instantaneous: THR bytes go straight to the sink, so THR and the
 * transmitter are always empty and the only cost per character is the exit.
 */
import { SharedLock } from "../../../sync/shared-lock.js";
import type { PioDevice } from "../../pio-bus.js";

const RX_CAPACITY = 64;

// Int32 slots of the shared state.
const S = {
  LOCK: 0,
  IER: 1,
  LCR: 2,
  MCR: 3,
  SCR: 4,
  DLL: 5,
  DLM: 6,
  FCR: 7,
  THRE_PENDING: 8,
  RX_HEAD: 9,
  RX_COUNT: 10,
  RX: 11,
} as const;
const SLOTS = S.RX + RX_CAPACITY;

// Register offsets (PC16550D Table 2).
const RBR_THR = 0;
const IER = 1;
const IIR_FCR = 2;
const LCR = 3;
const MCR = 4;
const LSR = 5;
const MSR = 6;
const SCR = 7;

const IER_ERBFI = 0x01;
const IER_ETBEI = 0x02;
const LCR_DLAB = 0x80;
const MCR_LOOP = 0x10;
const IIR_NONE = 0x01;
const IIR_THRE = 0x02;
const IIR_RDA = 0x04;
const IIR_FIFO_ENABLED = 0xc0;
const FCR_ENABLE = 0x01;
const FCR_CLEAR_RX = 0x02;
const LSR_DR = 0x01;
const LSR_THRE = 0x20;
const LSR_TEMT = 0x40;
const MSR_CTS = 0x10;
const MSR_DSR = 0x20;
const MSR_RI = 0x40;
const MSR_DCD = 0x80;

/** Plain-data state, what a snapshot saves. */
export interface SerialState {
  ier: number;
  lcr: number;
  mcr: number;
  scr: number;
  dll: number;
  dlm: number;
  fcr: number;
  threPending: boolean;
  rx: number[];
}

export function createSerialShared(): SharedArrayBuffer {
  const sab = new SharedArrayBuffer(SLOTS * 4);
  const s = new Int32Array(sab);
  // Divisor 12 = 9600 baud at the 1.8432 MHz reference clock, the reset value firmware leaves.
  s[S.DLL] = 12;
  s[S.LCR] = 0x03;
  s[S.MCR] = 0x08;
  return sab;
}

export class Serial implements PioDevice {
  private readonly s: Int32Array;
  private readonly lock: SharedLock;
  private readonly one = new Uint8Array(1);

  /**
   * @param shared state from createSerialShared(), the same buffer in every thread
   * @param raiseIrq pulses the UART's interrupt line (edge, ISA IRQ)
   * @param sink receives transmitted bytes
   */
  constructor(
    shared: SharedArrayBuffer,
    private readonly raiseIrq: () => void,
    private readonly sink: (bytes: Uint8Array) => void,
  ) {
    this.s = new Int32Array(shared);
    this.lock = new SharedLock(this.s, S.LOCK);
  }

  read(offset: number, _size: number): number {
    return this.lock.with(() => this.readLocked(offset));
  }

  write(offset: number, _size: number, value: number): void {
    // The interrupt pulse is sent while holding the lock: two threads pulsing the same edge-triggered
    // line concurrently (a vCPU after THR, the main thread after input) could otherwise interleave as
    // 1,1,0,0 -- a single edge -- and an input byte that arrived after the guest's handler had already
    // read IIR would wait for an interrupt that never comes.
    this.lock.with(() => {
      if (this.writeLocked(offset, value & 0xff)) this.raiseIrq();
    });
  }

  /**
   * Console input from the host. Returns how many bytes were accepted; the
   * caller keeps the rest and offers them again later (the FIFO is bounded).
   */
  receive(bytes: Uint8Array): number {
    let accepted = 0;
    this.lock.with(() => {
      const s = this.s;
      for (const b of bytes) {
        if (s[S.RX_COUNT]! >= RX_CAPACITY) break;
        this.pushRx(b);
        accepted++;
      }
      // Under the lock, like write(): one whole pulse per event.
      if (accepted > 0 && (s[S.IER]! & IER_ERBFI) !== 0) this.raiseIrq();
    });
    return accepted;
  }

  /** Free space in the receive FIFO. */
  rxSpace(): number {
    return RX_CAPACITY - Atomics.load(this.s, S.RX_COUNT);
  }

  save(): SerialState {
    return this.lock.with(() => {
      const s = this.s;
      const rx: number[] = [];
      for (let i = 0; i < s[S.RX_COUNT]!; i++) rx.push(s[S.RX + ((s[S.RX_HEAD]! + i) % RX_CAPACITY)]!);
      return {
        ier: s[S.IER]!, lcr: s[S.LCR]!, mcr: s[S.MCR]!, scr: s[S.SCR]!, dll: s[S.DLL]!, dlm: s[S.DLM]!,
        fcr: s[S.FCR]!, threPending: s[S.THRE_PENDING] === 1, rx,
      };
    });
  }

  restore(st: SerialState): void {
    this.lock.with(() => {
      const s = this.s;
      s[S.IER] = st.ier & 0x0f;
      s[S.LCR] = st.lcr & 0xff;
      s[S.MCR] = st.mcr & 0x1f;
      s[S.SCR] = st.scr & 0xff;
      s[S.DLL] = st.dll & 0xff;
      s[S.DLM] = st.dlm & 0xff;
      s[S.FCR] = st.fcr & FCR_ENABLE;
      s[S.THRE_PENDING] = st.threPending ? 1 : 0;
      s[S.RX_HEAD] = 0;
      s[S.RX_COUNT] = 0;
      for (const b of st.rx.slice(0, RX_CAPACITY)) this.pushRx(b & 0xff);
    });
  }

  private pushRx(b: number): void {
    const s = this.s;
    s[S.RX + ((s[S.RX_HEAD]! + s[S.RX_COUNT]!) % RX_CAPACITY)] = b;
    s[S.RX_COUNT]!++;
  }

  private iir(): number {
    const s = this.s;
    const fifo = s[S.FCR]! & FCR_ENABLE ? IIR_FIFO_ENABLED : 0;
    // Priority order (PC16550D Table 4): line status, received data, THR empty, modem status.
    if ((s[S.IER]! & IER_ERBFI) !== 0 && s[S.RX_COUNT]! > 0) return fifo | IIR_RDA;
    if ((s[S.IER]! & IER_ETBEI) !== 0 && s[S.THRE_PENDING] === 1) return fifo | IIR_THRE;
    return fifo | IIR_NONE;
  }

  private readLocked(offset: number): number {
    const s = this.s;
    const dlab = (s[S.LCR]! & LCR_DLAB) !== 0;
    switch (offset) {
      case RBR_THR: {
        if (dlab) return s[S.DLL]!;
        if (s[S.RX_COUNT] === 0) return 0;
        const b = s[S.RX + s[S.RX_HEAD]!]!;
        s[S.RX_HEAD] = (s[S.RX_HEAD]! + 1) % RX_CAPACITY;
        s[S.RX_COUNT]!--;
        return b;
      }
      case IER:
        return dlab ? s[S.DLM]! : s[S.IER]!;
      case IIR_FCR: {
        const v = this.iir();
        // Reading IIR while it reports THRE clears that source (PC16550D §8.4).
        if ((v & 0x0f) === IIR_THRE) s[S.THRE_PENDING] = 0;
        return v;
      }
      case LCR:
        return s[S.LCR]!;
      case MCR:
        return s[S.MCR]!;
      case LSR:
        return (s[S.RX_COUNT]! > 0 ? LSR_DR : 0) | LSR_THRE | LSR_TEMT;
      case MSR: {
        const mcr = s[S.MCR]!;
        if ((mcr & MCR_LOOP) === 0) return MSR_DCD | MSR_DSR | MSR_CTS;
        // Loopback wires RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD (PC16550D §8.6 MCR bit 4).
        return ((mcr & 0x02) ? MSR_CTS : 0) | ((mcr & 0x01) ? MSR_DSR : 0) |
          ((mcr & 0x04) ? MSR_RI : 0) | ((mcr & 0x08) ? MSR_DCD : 0);
      }
      case SCR:
        return s[S.SCR]!;
      default:
        return 0xff;
    }
  }

  /** Returns true when the access raised an interrupt condition. */
  private writeLocked(offset: number, v: number): boolean {
    const s = this.s;
    const dlab = (s[S.LCR]! & LCR_DLAB) !== 0;
    switch (offset) {
      case RBR_THR:
        if (dlab) {
          s[S.DLL] = v;
          return false;
        }
        if ((s[S.MCR]! & MCR_LOOP) !== 0) {
          if (s[S.RX_COUNT]! < RX_CAPACITY) this.pushRx(v);
        } else {
          this.one[0] = v;
          this.sink(this.one);
        }
        // Transmission is instant, so THR is empty again at once.
        s[S.THRE_PENDING] = 1;
        return (this.iir() & 0x0f) !== IIR_NONE;
      case IER: {
        if (dlab) {
          s[S.DLM] = v;
          return false;
        }
        const old = s[S.IER]!;
        s[S.IER] = v & 0x0f;
        // Enabling ETBEI with THR empty raises THRE at once; Linux relies on this to start transmitting.
        if ((v & IER_ETBEI) !== 0 && (old & IER_ETBEI) === 0) s[S.THRE_PENDING] = 1;
        return (this.iir() & 0x0f) !== IIR_NONE;
      }
      case IIR_FCR:
        s[S.FCR] = v & FCR_ENABLE;
        if ((v & FCR_CLEAR_RX) !== 0) {
          s[S.RX_HEAD] = 0;
          s[S.RX_COUNT] = 0;
        }
        return false;
      case LCR:
        s[S.LCR] = v;
        return false;
      case MCR:
        s[S.MCR] = v & 0x1f;
        return false;
      case SCR:
        s[S.SCR] = v;
        return false;
      default:
        return false; // LSR and MSR are read-only
    }
  }
}
