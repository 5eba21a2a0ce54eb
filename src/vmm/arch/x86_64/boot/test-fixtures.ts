/**
 * Test-only helpers for the boot loader tests: synthetic bzImages and ELF
 * files built field by field from the specs, a GuestMemory that records every
 * write, and where to find real Debian kernels.
 */
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { GuestMemory } from "../../../memory/guest-memory.js";

export interface FakeBzImageOptions {
  setupSects?: number;
  version?: number;
  loadflags?: number;
  xloadflags?: number;
  relocatable?: boolean;
  kernelAlignment?: number;
  prefAddress?: bigint;
  initSize?: number;
  cmdlineSize?: number;
  initrdAddrMax?: number;
  /** Bytes of protected-mode code (default 64 KiB). */
  pmSize?: number;
  /** Placed at payload_offset 0x100 inside the protected-mode code. */
  payload?: Uint8Array;
  kernelVersion?: string;
}

/** A bzImage with a valid boot protocol 2.15 setup header (boot.rst) and a patterned body. */
export function fakeBzImage(o: FakeBzImageOptions = {}): Uint8Array {
  const setupSects = o.setupSects ?? 4;
  const payloadOffset = 0x100;
  const pmSize = Math.max(o.pmSize ?? 0x10000, o.payload !== undefined ? payloadOffset + o.payload.length : 0);
  const setupBytes = ((setupSects === 0 ? 4 : setupSects) + 1) * 512;
  const img = new Uint8Array(setupBytes + pmSize);
  const dv = new DataView(img.buffer);
  img[0x1f1] = setupSects;
  dv.setUint32(0x1f4, Math.floor(pmSize / 16), true); // syssize
  dv.setUint16(0x1fe, 0xaa55, true);
  img[0x200] = 0xeb;
  img[0x201] = 0x6a; // header ends at 0x26c, as in Linux 6.x
  dv.setUint32(0x202, 0x53726448, true);
  dv.setUint16(0x206, o.version ?? 0x020f, true);
  const kv = o.kernelVersion ?? "6.1.0-fake (test@typevisor) #1 SMP";
  dv.setUint16(0x20e, 0x300 - 0x200, true);
  img.set(new TextEncoder().encode(kv + "\0"), 0x300);
  img[0x211] = o.loadflags ?? 0x01;
  dv.setUint32(0x214, 0x100000, true); // code32_start
  dv.setUint32(0x22c, o.initrdAddrMax ?? 0x7fffffff, true);
  dv.setUint32(0x230, o.kernelAlignment ?? 0x200000, true);
  img[0x234] = (o.relocatable ?? true) ? 1 : 0;
  img[0x235] = 21; // min_alignment
  dv.setUint16(0x236, o.xloadflags ?? 0x7f, true);
  dv.setUint32(0x238, o.cmdlineSize ?? 2047, true);
  if (o.payload !== undefined) {
    dv.setUint32(0x248, payloadOffset, true);
    dv.setUint32(0x24c, o.payload.length, true);
  }
  dv.setBigUint64(0x258, o.prefAddress ?? 0x1000000n, true);
  dv.setUint32(0x260, o.initSize ?? 0x400000, true);
  // Body: a pattern so a copy at the wrong offset shows.
  for (let i = setupBytes; i < img.length; i++) img[i] = (i * 7 + 3) & 0xff;
  if (o.payload !== undefined) img.set(o.payload, setupBytes + payloadOffset);
  return img;
}

export interface FakeSegment {
  paddr: number;
  data: Uint8Array;
  memSize?: number;
}

export interface FakeElfOptions {
  segments: FakeSegment[];
  /** Value of XEN_ELFNOTE_PHYS32_ENTRY; omitted = no PVH note. */
  pvhEntry?: number;
  /** Note descriptor width (Linux uses .long now, a pointer in older builds). */
  pvhEntryBytes?: 4 | 8;
  /** Put the notes only in a SHT_NOTE section, not in a PT_NOTE segment. */
  notesInSectionOnly?: boolean;
}

function note(name: string, type: number, desc: Uint8Array): Uint8Array {
  const nameBytes = new TextEncoder().encode(name + "\0");
  const pad = (n: number) => Math.ceil(n / 4) * 4;
  const out = new Uint8Array(12 + pad(nameBytes.length) + pad(desc.length));
  const dv = new DataView(out.buffer);
  dv.setUint32(0, nameBytes.length, true);
  dv.setUint32(4, desc.length, true);
  dv.setUint32(8, type, true);
  out.set(nameBytes, 12);
  out.set(desc, 12 + pad(nameBytes.length));
  return out;
}

/** An ELF64 x86-64 executable (gABI layout: ehdr, phdrs, notes, segment data, shdrs). */
export function fakeElf(o: FakeElfOptions): Uint8Array {
  const notes: Uint8Array[] = [note("GNU", 3, new Uint8Array([1, 2, 3, 4]))];
  if (o.pvhEntry !== undefined) {
    const width = o.pvhEntryBytes ?? 4;
    const desc = new Uint8Array(width);
    const ddv = new DataView(desc.buffer);
    if (width === 4) ddv.setUint32(0, o.pvhEntry, true);
    else ddv.setBigUint64(0, BigInt(o.pvhEntry), true);
    notes.push(note("Xen", 18, desc));
  }
  const noteBlob = new Uint8Array(notes.reduce((n, b) => n + b.length, 0));
  notes.reduce((off, b) => (noteBlob.set(b, off), off + b.length), 0);

  const withPtNote = !o.notesInSectionOnly;
  const phnum = o.segments.length + (withPtNote ? 1 : 0);
  const phoff = 64;
  let off = phoff + phnum * 56;
  const noteOff = off;
  off += noteBlob.length;
  const segOffs = o.segments.map((s) => {
    off = Math.ceil(off / 16) * 16;
    const at = off;
    off += s.data.length;
    return at;
  });
  off = Math.ceil(off / 8) * 8;
  const shoff = off;
  const shnum = 2; // null + .notes
  const img = new Uint8Array(shoff + shnum * 64);
  const dv = new DataView(img.buffer);
  img.set([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1], 0);
  dv.setUint16(16, 2, true); // ET_EXEC
  dv.setUint16(18, 62, true); // EM_X86_64
  dv.setUint32(20, 1, true);
  dv.setBigUint64(24, BigInt(o.segments[0]?.paddr ?? 0), true);
  dv.setBigUint64(32, BigInt(phoff), true);
  dv.setBigUint64(40, BigInt(shoff), true);
  dv.setUint16(52, 64, true);
  dv.setUint16(54, 56, true);
  dv.setUint16(56, phnum, true);
  dv.setUint16(58, 64, true);
  dv.setUint16(60, shnum, true);
  o.segments.forEach((s, i) => {
    const ph = phoff + i * 56;
    dv.setUint32(ph, 1, true); // PT_LOAD
    dv.setUint32(ph + 4, 5, true);
    dv.setBigUint64(ph + 8, BigInt(segOffs[i]!), true);
    dv.setBigUint64(ph + 16, BigInt(s.paddr) + 0xffffffff80000000n, true); // vaddr: like a kernel's
    dv.setBigUint64(ph + 24, BigInt(s.paddr), true);
    dv.setBigUint64(ph + 32, BigInt(s.data.length), true);
    dv.setBigUint64(ph + 40, BigInt(s.memSize ?? s.data.length), true);
    dv.setBigUint64(ph + 48, 0x200000n, true);
    img.set(s.data, segOffs[i]!);
  });
  if (withPtNote) {
    const ph = phoff + o.segments.length * 56;
    dv.setUint32(ph, 4, true); // PT_NOTE
    dv.setBigUint64(ph + 8, BigInt(noteOff), true);
    dv.setBigUint64(ph + 32, BigInt(noteBlob.length), true);
    dv.setBigUint64(ph + 40, BigInt(noteBlob.length), true);
  }
  img.set(noteBlob, noteOff);
  const sh = shoff + 64;
  dv.setUint32(sh + 4, 7, true); // SHT_NOTE
  dv.setBigUint64(sh + 24, BigInt(noteOff), true);
  dv.setBigUint64(sh + 32, BigInt(noteBlob.length), true);
  return img;
}

export interface RecordedWrite {
  addr: number;
  len: number;
}

/** GuestMemory over one plain ArrayBuffer at guest address 0, recording every write. */
export class RecordingMemory extends GuestMemory {
  readonly writes: RecordedWrite[] = [];
  constructor(readonly bytes: number) {
    super(new ArrayBuffer(bytes), [{ guestPhysAddr: 0, size: bytes, hostOffset: 0 }]);
  }
  override write(gpa: number, data: Uint8Array): void {
    this.writes.push({ addr: gpa, len: data.length });
    super.write(gpa, data);
  }
  override fill(gpa: number, len: number, value = 0): void {
    this.writes.push({ addr: gpa, len });
    super.fill(gpa, len, value);
  }
  override writeU8(gpa: number, v: number): void {
    this.writes.push({ addr: gpa, len: 1 });
    super.writeU8(gpa, v);
  }
  override writeU16(gpa: number, v: number): void {
    this.writes.push({ addr: gpa, len: 2 });
    super.writeU16(gpa, v);
  }
  override writeU32(gpa: number, v: number): void {
    this.writes.push({ addr: gpa, len: 4 });
    super.writeU32(gpa, v);
  }
  override writeU64(gpa: number, v: bigint): void {
    this.writes.push({ addr: gpa, len: 8 });
    super.writeU64(gpa, v);
  }
}

function cacheRoots(): string[] {
  const roots: string[] = [];
  if (process.env.TYPEVISOR_CACHE) roots.push(process.env.TYPEVISOR_CACHE);
  if (process.env.XDG_CACHE_HOME) roots.push(join(process.env.XDG_CACHE_HOME, "typevisor"));
  roots.push(join(homedir(), ".cache", "typevisor"));
  return roots;
}

/** Files named like `pattern` under dir, at most `depth` levels down. */
function findFiles(dir: string, pattern: RegExp, depth: number): string[] {
  if (depth < 0 || !existsSync(dir)) return [];
  const out: string[] = [];
  let entries;
  try {
    entries = readdirSync(dir, { withFileTypes: true });
  } catch {
    return [];
  }
  for (const e of entries) {
    const p = join(dir, e.name);
    // Skip the package cache's half-extracted temp dirs.
    if (e.isDirectory() && !e.name.includes(".tmp-")) out.push(...findFiles(p, pattern, depth - 1));
    else if (e.isFile() && pattern.test(e.name)) out.push(p);
  }
  return out.sort();
}

/**
 * A real Debian bzImage: $TYPEVISOR_TEST_KERNEL (cloud) or
 * $TYPEVISOR_TEST_KERNEL_GENERIC, else the newest `vmlinuz-*-cloud-amd64`
 * (or generic `vmlinuz-*-amd64`) under the package cache
 * ($TYPEVISOR_CACHE, $XDG_CACHE_HOME/typevisor, ~/.cache/typevisor).
 */
export function findDebianKernel(flavour: "cloud" | "generic"): string | undefined {
  const env = flavour === "cloud" ? process.env.TYPEVISOR_TEST_KERNEL : process.env.TYPEVISOR_TEST_KERNEL_GENERIC;
  if (env) return existsSync(env) ? env : undefined;
  const pattern = flavour === "cloud" ? /^vmlinuz-.*-cloud-amd64$/ : /^vmlinuz-[0-9.]+-\d+-amd64$/;
  const found = cacheRoots().flatMap((r) => findFiles(r, pattern, 5));
  return found.at(-1);
}

export function readIfPresent(path: string | undefined): Uint8Array | undefined {
  return path === undefined ? undefined : new Uint8Array(readFileSync(path));
}
