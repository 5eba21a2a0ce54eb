/**
 * A tiny test kernel that boots through the ordinary bzImage path
 * (`typevisor run --kernel FILE`): a Linux boot protocol 2.15 setup header with
 * XLF_KERNEL_64, so the loader enters its 64-bit code at load address + 0x200
 * (Documentation/arch/x86/boot.rst §"64-bit Boot Protocol") in long mode with
 * the loader's identity map of [0, 4 GiB) (which covers the IOAPIC at
 * 0xfec00000 and the LAPIC at 0xfee00000).
 *
 * The guest: prints "tiny-guest: up\n" on COM1, then idles in `sti; hlt`.
 * Serial input is interrupt-driven, so an idle guest costs the host nothing:
 * UART IER = "received data available", MCR OUT2 (the PC's IRQ gate); IOAPIC
 * redirection entry 4 (ISA IRQ 4 = GSI 4: our MADT has no override for it, KVM's
 * default routing maps ISA IRQs 1:1) to vector 0x30, fixed, physical, edge,
 * active-high, destination APIC 0 (82093AA datasheet §3.2.4); LAPIC software-
 * enabled through the spurious-interrupt register (SDM vol. 3 §10.9); both 8259s
 * masked (OCW1) so the same IRQ does not also arrive as ExtINT through LINT0.
 * The handler drains the receive FIFO (LSR bit 0), echoes each byte, and writes
 * the LAPIC EOI register. Three bytes are commands instead of text:
 *   0x04 (Ctrl-D) power off: SLP_TYP=5|SLP_EN to the ACPI sleep control register (port 0x600)
 *   0x12 (Ctrl-R) reset: the ACPI reset register (port 0x602)
 *   0x07 (Ctrl-G) crash: load an empty IDT and execute ud2 -> #UD, #DF, triple fault
 * Vectors 0-31 are left not-present, so any unexpected exception also ends in a
 * triple fault (a visible crash) rather than a silent hang.
 *
 * The machine code is position-independent (RIP-relative), hand-assembled from
 * the listing in the comments (GNU as syntax, Intel operand order). Its IDT
 * (4 KiB at +0x1000) and stack (top at +0x3000) lie past the file's end but
 * inside init_size, which the loader reserves.
 */
import { writeFileSync } from "node:fs";

/** What the guest prints once its serial interrupt is set up. */
export const TINY_KERNEL_BANNER = "tiny-guest: up\n";
/** Serial input bytes the guest treats as commands. */
export const TINY_KERNEL_KEYS = { POWEROFF: 0x04, RESET: 0x12, CRASH: 0x07 } as const;

/** 32-bit entry (startup_32 at +0): never used by our loader; halts if something enters it. */
const ENTRY32: number[][] = [
  // startup_32 (+0x0)
  [0xf4], // hlt
  [0xeb, 0xfd], // jmp 0 <startup_32>
];

/** 64-bit entry at +0x200 and everything it calls, up to the banner at +0x34b. */
const ENTRY64: number[][] = [
  // startup_64 (+0x200)
  [0xfa], // cli
  [0x48, 0x8d, 0x25, 0xf8, 0x2d, 0x00, 0x00], // lea rsp,[rip+0x2df8] ; -> 3000 <stack_top>
  [0xb0, 0xff], // mov al,0xff
  [0xe6, 0x21], // out 0x21,al
  [0xe6, 0xa1], // out 0xa1,al
  [0x48, 0x8d, 0x3d, 0xeb, 0x0d, 0x00, 0x00], // lea rdi,[rip+0xdeb] ; -> 1000 <idt>
  [0x31, 0xc0], // xor eax,eax
  [0xb9, 0x00, 0x02, 0x00, 0x00], // mov ecx,0x200
  [0xf3, 0x48, 0xab], // rep stos QWORD PTR es:[rdi],rax
  [0x48, 0x8d, 0x05, 0xd1, 0x00, 0x00, 0x00], // lea rax,[rip+0xd1] ; -> 2f7 <ignore_isr>
  [0x48, 0x8d, 0x3d, 0xd3, 0x0f, 0x00, 0x00], // lea rdi,[rip+0xfd3] ; -> 1200 <idt+0x200>
  [0xb9, 0xe0, 0x00, 0x00, 0x00], // mov ecx,0xe0
  // fill (+0x232)
  [0xe8, 0x97, 0x00, 0x00, 0x00], // call 2ce <set_gate>
  [0x48, 0x83, 0xc7, 0x10], // add rdi,0x10
  [0xe2, 0xf5], // loop 232 <fill>
  [0x48, 0x8d, 0x05, 0xb5, 0x00, 0x00, 0x00], // lea rax,[rip+0xb5] ; -> 2f9 <uart_isr>
  [0x48, 0x8d, 0x3d, 0xb5, 0x10, 0x00, 0x00], // lea rdi,[rip+0x10b5] ; -> 1300 <idt+0x300>
  [0xe8, 0x7e, 0x00, 0x00, 0x00], // call 2ce <set_gate>
  [0x48, 0x8d, 0x05, 0xa9, 0x0d, 0x00, 0x00], // lea rax,[rip+0xda9] ; -> 1000 <idt>
  [0x48, 0x83, 0xec, 0x10], // sub rsp,0x10
  [0x66, 0xc7, 0x44, 0x24, 0x06, 0xff, 0x0f], // mov WORD PTR [rsp+0x6],0xfff
  [0x48, 0x89, 0x44, 0x24, 0x08], // mov QWORD PTR [rsp+0x8],rax
  [0x0f, 0x01, 0x5c, 0x24, 0x06], // lidt [rsp+0x6]
  [0x48, 0x83, 0xc4, 0x10], // add rsp,0x10
  [0xbf, 0x00, 0x00, 0xe0, 0xfe], // mov edi,0xfee00000
  [0xc7, 0x87, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // mov DWORD PTR [rdi+0x80],0x0
  [0xc7, 0x87, 0xf0, 0x00, 0x00, 0x00, 0xff, 0x01, 0x00, 0x00], // mov DWORD PTR [rdi+0xf0],0x1ff
  [0xbf, 0x00, 0x00, 0xc0, 0xfe], // mov edi,0xfec00000
  [0xc7, 0x07, 0x18, 0x00, 0x00, 0x00], // mov DWORD PTR [rdi],0x18
  [0xc7, 0x47, 0x10, 0x30, 0x00, 0x00, 0x00], // mov DWORD PTR [rdi+0x10],0x30
  [0xc7, 0x07, 0x19, 0x00, 0x00, 0x00], // mov DWORD PTR [rdi],0x19
  [0xc7, 0x47, 0x10, 0x00, 0x00, 0x00, 0x00], // mov DWORD PTR [rdi+0x10],0x0
  [0x66, 0xba, 0xf9, 0x03], // mov dx,0x3f9
  [0xb0, 0x01], // mov al,0x1
  [0xee], // out dx,al
  [0x66, 0xba, 0xfc, 0x03], // mov dx,0x3fc
  [0xb0, 0x0b], // mov al,0xb
  [0xee], // out dx,al
  [0x48, 0x8d, 0x35, 0x8e, 0x00, 0x00, 0x00], // lea rsi,[rip+0x8e] ; -> 34b <banner>
  [0xb9, 0x0f, 0x00, 0x00, 0x00], // mov ecx,0xf
  [0x66, 0xba, 0xf8, 0x03], // mov dx,0x3f8
  // print (+0x2c6)
  [0xac], // lods al,BYTE PTR ds:[rsi]
  [0xee], // out dx,al
  [0xe2, 0xfc], // loop 2c6 <print>
  // idle (+0x2ca)
  [0xfb], // sti
  [0xf4], // hlt
  [0xeb, 0xfc], // jmp 2ca <idle>
  // set_gate (+0x2ce)
  [0x66, 0x89, 0x07], // mov WORD PTR [rdi],ax
  [0x66, 0xc7, 0x47, 0x02, 0x10, 0x00], // mov WORD PTR [rdi+0x2],0x10
  [0x66, 0xc7, 0x47, 0x04, 0x00, 0x8e], // mov WORD PTR [rdi+0x4],0x8e00
  [0x48, 0x89, 0xc2], // mov rdx,rax
  [0x48, 0xc1, 0xea, 0x10], // shr rdx,0x10
  [0x66, 0x89, 0x57, 0x06], // mov WORD PTR [rdi+0x6],dx
  [0x48, 0xc1, 0xea, 0x10], // shr rdx,0x10
  [0x89, 0x57, 0x08], // mov DWORD PTR [rdi+0x8],edx
  [0xc7, 0x47, 0x0c, 0x00, 0x00, 0x00, 0x00], // mov DWORD PTR [rdi+0xc],0x0
  [0xc3], // ret
  // ignore_isr (+0x2f7)
  [0x48, 0xcf], // iretq
  // uart_isr (+0x2f9)
  [0x50], // push rax
  [0x52], // push rdx
  [0x57], // push rdi
  // drain (+0x2fc)
  [0x66, 0xba, 0xfd, 0x03], // mov dx,0x3fd
  [0xec], // in al,dx
  [0xa8, 0x01], // test al,0x1
  [0x74, 0x14], // je 319 <eoi>
  [0x66, 0xba, 0xf8, 0x03], // mov dx,0x3f8
  [0xec], // in al,dx
  [0x3c, 0x04], // cmp al,0x4
  [0x74, 0x1f], // je 32d <poweroff>
  [0x3c, 0x12], // cmp al,0x12
  [0x74, 0x24], // je 336 <reset>
  [0x3c, 0x07], // cmp al,0x7
  [0x74, 0x2b], // je 341 <crash>
  [0xee], // out dx,al
  [0xeb, 0xe3], // jmp 2fc <drain>
  // eoi (+0x319)
  [0xbf, 0x00, 0x00, 0xe0, 0xfe], // mov edi,0xfee00000
  [0xc7, 0x87, 0xb0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // mov DWORD PTR [rdi+0xb0],0x0
  [0x5f], // pop rdi
  [0x5a], // pop rdx
  [0x58], // pop rax
  [0x48, 0xcf], // iretq
  // poweroff (+0x32d)
  [0x66, 0xba, 0x00, 0x06], // mov dx,0x600
  [0xb0, 0x34], // mov al,0x34
  [0xee], // out dx,al
  [0xeb, 0x07], // jmp 33d <halt>
  // reset (+0x336)
  [0x66, 0xba, 0x02, 0x06], // mov dx,0x602
  [0xb0, 0x01], // mov al,0x1
  [0xee], // out dx,al
  // halt (+0x33d)
  [0xfa], // cli
  [0xf4], // hlt
  [0xeb, 0xfc], // jmp 33d <halt>
  // crash (+0x341)
  [0x6a, 0x00], // push 0x0
  [0x6a, 0x00], // push 0x0
  [0x0f, 0x01, 0x1c, 0x24], // lidt [rsp]
  [0x0f, 0x0b], // ud2

];

const ENTRY64_OFFSET = 0x200;
/** The RIP-relative `lea rsi` before `print` points here. */
const BANNER_OFFSET = 0x34b;
/** IDT at +0x1000 and stack up to +0x3000 must be inside the memory the loader reserves. */
const INIT_SIZE = 0x4000;
/** One 512-byte setup sector after the boot sector: the protected-mode code starts at file offset 0x400. */
const SETUP_SECTS = 1;
const KERNEL_VERSION = "tiny-guest (typevisor test kernel)";

/** The protected-mode part: 32-bit stub, 64-bit code at +0x200, then the banner. */
function protectedModeCode(): Uint8Array {
  const e32 = ENTRY32.flat();
  const e64 = ENTRY64.flat();
  if (ENTRY64_OFFSET + e64.length !== BANNER_OFFSET) {
    throw new Error(`tiny kernel: code is ${e64.length} bytes, the banner must start at +0x${BANNER_OFFSET.toString(16)}`);
  }
  const banner = new TextEncoder().encode(TINY_KERNEL_BANNER);
  const out = new Uint8Array(BANNER_OFFSET + banner.length);
  out.set(e32, 0);
  out.set(e64, ENTRY64_OFFSET);
  out.set(banner, BANNER_OFFSET);
  return out;
}

/**
 * The whole bzImage: boot sector + one setup sector carrying the setup header
 * (boot.rst §"The Real-Mode Kernel Header"; only the fields our loader and any
 * boot-protocol loader read are set), then the protected-mode code.
 */
export function tinyKernelImage(): Uint8Array {
  return bzImage(protectedModeCode(), { version: KERNEL_VERSION, initSize: INIT_SIZE });
}

/**
 * A boot protocol 2.15 bzImage around 64-bit protected-mode `code` (entered at +0x200 with
 * XLF_KERNEL_64), for purpose-built test guests. `loadAt`: code that is not position-independent
 * and must run at that address (loaded there, not relocatable); without it, relocatable (4 KiB
 * alignment), preferably at 16 MiB.
 */
export function bzImage(code: Uint8Array, o: { version: string; initSize: number; loadAt?: number }): Uint8Array {
  // syssize counts 16-byte paragraphs; pad the code to a whole one.
  const pmSize = Math.ceil(code.length / 16) * 16;
  const setupBytes = (SETUP_SECTS + 1) * 512;
  const img = new Uint8Array(setupBytes + pmSize);
  const dv = new DataView(img.buffer);
  img[0x1f1] = SETUP_SECTS;
  dv.setUint32(0x1f4, pmSize / 16, true); // syssize
  dv.setUint16(0x1fe, 0xaa55, true); // boot_flag
  img[0x200] = 0xeb; // jmp short over the header: its displacement gives the header's end
  img[0x201] = 0x6a; // header ends at 0x26c (protocol 2.15's last field, init_size, ends at 0x264)
  dv.setUint32(0x202, 0x53726448, true); // "HdrS"
  dv.setUint16(0x206, 0x020f, true); // protocol 2.15
  dv.setUint16(0x20e, 0x300 - 0x200, true); // kernel_version: string at 0x300 in the setup sector
  img.set(new TextEncoder().encode(o.version + "\0"), 0x300);
  img[0x211] = 0x01; // loadflags: LOADED_HIGH (protected-mode code at 1 MiB or above)
  dv.setUint32(0x214, o.loadAt ?? 0x100000, true); // code32_start
  dv.setUint32(0x22c, 0x7fffffff, true); // initrd_addr_max
  dv.setUint32(0x230, 0x200000, true); // kernel_alignment: 2 MiB
  if (o.loadAt === undefined) {
    img[0x234] = 1; // relocatable_kernel: the code is position-independent
    img[0x235] = 12; // min_alignment: 4 KiB (log2)
  }
  dv.setUint16(0x236, 0x01, true); // xloadflags: XLF_KERNEL_64 (64-bit entry at +0x200)
  dv.setUint32(0x238, 255, true); // cmdline_size
  dv.setBigUint64(0x258, BigInt(o.loadAt ?? 0x1000000), true); // pref_address: 16 MiB unless told
  dv.setUint32(0x260, o.initSize, true); // init_size
  img.set(code, setupBytes);
  return img;
}

/** Write the tiny kernel to `path` (for `typevisor run --kernel path --force-kvm`). */
export function writeTinyKernel(path: string): void {
  writeFileSync(path, tinyKernelImage());
}
