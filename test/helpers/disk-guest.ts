/**
 * The disk-writing test guest (test/fixtures/disk-writer.c): compiled with gcc for a bare x86-64
 * (freestanding, no SSE, no red zone), linked at 16 MiB, flattened with objcopy and wrapped in a
 * Linux boot protocol 2.15 header (Documentation/arch/x86/boot.rst) that our loader takes like
 * any bzImage: not relocatable, pref_address 16 MiB, XLF_KERNEL_64 (entry at +0x200 in long
 * mode). `typevisor run --kernel FILE --disk ... --force-kvm` boots it on this host's PVM KVM.
 *
 * What it writes: sector s of the disk holds 128 little-endian u32 words, word k being
 * s * 2654435761 + k * 40503 + 12345 (mod 2^32) (checkDiskPattern).
 */
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { bzImage } from "./tiny-kernel.js";

const SOURCE = new URL("../fixtures/disk-writer.c", import.meta.url).pathname;
const LOAD = 0x1000000;
/** Code, data, bss (rings, a 64 KiB buffer, the stack): well inside this. */
const INIT_SIZE = 0x100000;

export const DISK_GUEST_DONE = "tv-disk: done\n";

const LINKER_SCRIPT = `
ENTRY(start64)
SECTIONS {
  . = ${LOAD};
  .head : { BYTE(0xf4) BYTE(0xeb) BYTE(0xfd) . = 0x200; *(.entry) }
  .text : { *(.text*) }
  .rodata : { *(.rodata*) }
  .data : { *(.data*) }
  .bss : { *(.bss*) *(COMMON) }
  /DISCARD/ : { *(.comment) *(.note*) *(.eh_frame*) }
}
`;

/** Build the guest as a bzImage at `path`. Needs gcc and binutils (the tests' packages). */
export function writeDiskGuest(path: string): void {
  writeCGuest(SOURCE, path, "tv-disk-writer (typevisor test guest)");
}

/** What test/fixtures/mem-dirtier.c prints once it runs; then "tv-dirty: pass N" every 16 passes over its 64 MiB. */
export const MEM_DIRTIER_UP = "tv-dirty: up\n";

/** The guest that dirties 64 MiB as fast as it can (test/fixtures/mem-dirtier.c; the VM needs 96 MiB or more). */
export function writeMemDirtier(path: string): void {
  writeCGuest(new URL("../fixtures/mem-dirtier.c", import.meta.url).pathname, path, "tv-mem-dirtier (typevisor test guest)");
}

/** Build a freestanding C test guest (entry `start64` in section .entry) as a bzImage at `path`. */
export function writeCGuest(source: string, path: string, version: string): void {
  const d = mkdtempSync(join(tmpdir(), "tv-cguest-"));
  try {
    writeFileSync(join(d, "link.ld"), LINKER_SCRIPT);
    execFileSync("gcc", [
      "-O2", "-ffreestanding", "-fno-pie", "-no-pie", "-nostdlib", "-static", "-mno-red-zone", "-mgeneral-regs-only",
      "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-mcmodel=small", "-Wl,--build-id=none",
      "-T", join(d, "link.ld"), "-o", join(d, "guest.elf"), source,
    ], { stdio: ["ignore", "pipe", "pipe"], timeout: 60_000 });
    execFileSync("objcopy", ["-O", "binary", "-j", ".head", "-j", ".text", "-j", ".rodata", "-j", ".data", join(d, "guest.elf"), join(d, "guest.bin")], { timeout: 60_000 });
    const pm = readFileSync(join(d, "guest.bin"));
    writeFileSync(path, cGuestImage(pm, version));
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
}

/** The guest as a bzImage, loaded at LOAD (its code is linked there, not position-independent). */
function cGuestImage(code: Uint8Array, version: string): Uint8Array {
  const pmSize = Math.ceil(code.length / 16) * 16;
  if (pmSize > INIT_SIZE / 2) throw new Error(`test guest is ${pmSize} bytes, past its init_size budget`);
  return bzImage(code, { version, initSize: INIT_SIZE, loadAt: LOAD });
}

/**
 * Where `disk` (the guest's view, raw bytes) differs from what the guest writes, as a message;
 * undefined when every sector holds its pattern.
 */
export function checkDiskPattern(disk: Buffer): string | undefined {
  const words = new Uint32Array(disk.buffer, disk.byteOffset, Math.floor(disk.length / 4));
  for (let s = 0; s < disk.length / 512; s++) {
    const base = (Math.imul(s, 2654435761) + 12345) >>> 0;
    for (let k = 0; k < 128; k++) {
      if (words[s * 128 + k] !== ((base + Math.imul(k, 40503)) >>> 0)) return `sector ${s} word ${k} is ${words[s * 128 + k]}, not ${(base + Math.imul(k, 40503)) >>> 0}`;
    }
  }
  return undefined;
}
