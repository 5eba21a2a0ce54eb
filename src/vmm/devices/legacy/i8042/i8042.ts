/**
 * Just enough of the i8042 keyboard controller for a guest to reset the
 * machine: command 0xFE on port 0x64 pulses the CPU reset line, the path
 * Linux's `reboot=k` (its fallback after ACPI reset) takes. Also answers the
 * controller self-test (0xAA -> 0x55) and the command-byte read so a probing
 * driver finds a sane, empty controller. No keyboard is attached.
 * (IBM PC/AT Technical Reference, "Keyboard controller" commands.)
 */
import type { PioDevice } from "../../pio-bus.js";

const STATUS_OBF = 0x01;
const STATUS_SYSFLAG = 0x04;

export type ResetRequest = () => void;

export class I8042 implements PioDevice {
  private out: number[] = [];
  private commandByte = 0x00;
  private pendingCommand = -1;

  /** `base` is 0x60; offset 0 = data port 0x60, offset 4 = command/status port 0x64. */
  constructor(private readonly onReset: ResetRequest) {}

  read(offset: number, _size: number): number {
    if (offset === 0) return this.out.shift() ?? 0;
    if (offset === 4) return STATUS_SYSFLAG | (this.out.length > 0 ? STATUS_OBF : 0);
    return 0xff;
  }

  write(offset: number, _size: number, value: number): void {
    const v = value & 0xff;
    if (offset === 0) {
      if (this.pendingCommand === 0x60) this.commandByte = v;
      else if (this.pendingCommand === 0xd1 && (v & 1) === 0) this.onReset(); // output port bit 0 = CPU reset
      this.pendingCommand = -1;
      return;
    }
    if (offset !== 4) return;
    switch (v) {
      case 0x20: this.queue(this.commandByte); break;
      case 0x60: case 0xd1: this.pendingCommand = v; break;
      case 0xaa: this.queue(0x55); break; // controller self-test passed
      case 0xab: this.queue(0x00); break; // keyboard interface test passed
      case 0xfe: this.onReset(); break;
      default: break;
    }
  }

  private queue(b: number): void {
    if (this.out.length < 16) this.out.push(b);
  }
}
