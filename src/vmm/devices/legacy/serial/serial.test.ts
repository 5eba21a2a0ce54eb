import { describe, expect, it } from "vitest";
import fc from "fast-check";
import { Serial, createSerialShared } from "./serial.js";

function make() {
  const out: number[] = [];
  let irqs = 0;
  const uart = new Serial(createSerialShared(), () => irqs++, (b) => out.push(...b));
  return { uart, out, irqs: () => irqs };
}

describe("16550A serial", () => {
  it("transmits THR writes to the sink and stays empty", () => {
    const { uart, out } = make();
    for (const c of Buffer.from("hi\n")) uart.write(0, 1, c);
    expect(Buffer.from(out).toString()).toBe("hi\n");
    expect(uart.read(5, 1) & 0x60).toBe(0x60);
  });

  it("raises THRE when ETBEI is enabled and clears it on IIR read", () => {
    const { uart, irqs } = make();
    uart.write(1, 1, 0x02);
    expect(irqs()).toBe(1);
    expect(uart.read(2, 1) & 0x0f).toBe(0x02);
    expect(uart.read(2, 1) & 0x0f).toBe(0x01);
  });

  it("delivers input with a received-data interrupt, in order", () => {
    const { uart, irqs } = make();
    uart.write(1, 1, 0x01);
    expect(uart.receive(Buffer.from("ab"))).toBe(2);
    expect(irqs()).toBe(1);
    expect(uart.read(2, 1) & 0x0f).toBe(0x04);
    expect(uart.read(5, 1) & 1).toBe(1);
    expect(uart.read(0, 1)).toBe(0x61);
    expect(uart.read(0, 1)).toBe(0x62);
    expect(uart.read(5, 1) & 1).toBe(0);
  });

  it("pulses its interrupt while holding the state lock, so concurrent pulses cannot merge into one edge", () => {
    const sab = createSerialShared();
    const lockWord = new Int32Array(sab);
    const held: boolean[] = [];
    const uart = new Serial(sab, () => held.push(Atomics.load(lockWord, 0) !== 0), () => {});
    uart.write(1, 1, 0x03); // ERBFI | ETBEI: THRE pulse
    uart.write(0, 1, 0x41); // THR: another THRE pulse
    uart.receive(Buffer.from("x")); // input: RDA pulse
    expect(held).toEqual([true, true, true]);
  });

  it("bounds the receive FIFO and reports how much it took", () => {
    const { uart } = make();
    expect(uart.receive(new Uint8Array(100))).toBe(64);
    expect(uart.rxSpace()).toBe(0);
  });

  it("reports a 16550A FIFO in IIR once FCR enables it (Linux autoconfig reads bits 7:6)", () => {
    const { uart } = make();
    uart.write(2, 1, 0x01);
    expect(uart.read(2, 1) & 0xc0).toBe(0xc0);
  });

  it("loops THR back to RBR and MCR to MSR in loopback mode", () => {
    const { uart, out } = make();
    uart.write(4, 1, 0x10 | 0x0a); // LOOP | RTS | OUT2
    expect(uart.read(6, 1) & 0xf0).toBe(0x90); // CTS | DCD
    uart.write(0, 1, 0x5a);
    expect(out.length).toBe(0);
    expect(uart.read(0, 1)).toBe(0x5a);
  });

  it("latches the divisor behind DLAB", () => {
    const { uart } = make();
    uart.write(3, 1, 0x80);
    uart.write(0, 1, 0x01);
    uart.write(1, 1, 0x00);
    uart.write(3, 1, 0x03);
    expect(uart.save().dll).toBe(1);
    expect(uart.read(1, 1)).toBe(0);
  });

  it("save/restore round-trips", () => {
    const { uart } = make();
    uart.write(1, 1, 0x01);
    uart.receive(Buffer.from("xyz"));
    uart.read(0, 1);
    const st = uart.save();
    const b = make();
    b.uart.restore(st);
    expect(b.uart.save()).toEqual(st);
    expect(b.uart.read(0, 1)).toBe(0x79);
  });

  it("never throws and keeps registers in range under arbitrary guest access", () => {
    fc.assert(
      fc.property(
        fc.array(fc.record({ write: fc.boolean(), off: fc.integer({ min: 0, max: 9 }), v: fc.integer({ min: -1, max: 0x1ff }) }), { maxLength: 200 }),
        (ops) => {
          const { uart } = make();
          for (const op of ops) {
            if (op.write) uart.write(op.off, 1, op.v);
            else {
              const r = uart.read(op.off, 1);
              expect(r).toBeGreaterThanOrEqual(0);
              expect(r).toBeLessThanOrEqual(0xff);
            }
          }
          const st = uart.save();
          expect(st.rx.length).toBeLessThanOrEqual(64);
        },
      ),
    );
  });
});
