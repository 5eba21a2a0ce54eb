/**
 * Port I/O dispatch. Devices register a port range; an access the bus cannot
 * route reads as all ones and writes are dropped, as on a PC's ISA bus with no
 * device decoding the address (nothing the guest does here can fault the VMM).
 */
export interface PioDevice {
  /** `offset` is relative to the device's base port; `size` is 1, 2 or 4. */
  read(offset: number, size: number): number;
  write(offset: number, size: number, value: number): void;
}

interface Range {
  base: number;
  len: number;
  dev: PioDevice;
}

export class PioBus {
  private readonly ranges: Range[] = [];
  /** Unrouted accesses, for stats and debugging. */
  unhandled = 0;

  register(base: number, len: number, dev: PioDevice): void {
    for (const r of this.ranges) {
      if (base < r.base + r.len && r.base < base + len) {
        throw new Error(`PIO range 0x${base.toString(16)}+${len} overlaps 0x${r.base.toString(16)}+${r.len}`);
      }
    }
    this.ranges.push({ base, len, dev });
  }

  private find(port: number): Range | undefined {
    for (const r of this.ranges) if (port >= r.base && port < r.base + r.len) return r;
    return undefined;
  }

  read(port: number, size: number): number {
    const r = this.find(port);
    if (r === undefined) {
      this.unhandled++;
      return size === 4 ? 0xffff_ffff : (1 << (size * 8)) - 1;
    }
    return r.dev.read(port - r.base, size);
  }

  write(port: number, size: number, value: number): void {
    const r = this.find(port);
    if (r === undefined) {
      this.unhandled++;
      return;
    }
    r.dev.write(port - r.base, size, value);
  }
}
