/**
 * ELF64 vmlinux parsing for the PVH boot path (System V gABI "ELF-64 Object
 * File Format"; x86-64 psABI). The file is hostile input: every offset and
 * size is checked against the file before it is used, and 64-bit fields must
 * fit a JS safe integer.
 *
 * The PVH entry is the Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY (18)
 * (xen/include/public/elfnote.h; Xen docs/misc/pvh.pandoc).
 */
import { kernelInvalid, hex } from "./errors.js";

export const ELF_MAGIC = 0x464c457f; // "\x7fELF" little-endian
const ELFCLASS64 = 2;
const ELFDATA2LSB = 1;
const EV_CURRENT = 1;
const ET_EXEC = 2;
const EM_X86_64 = 62;
const EHDR_SIZE = 64;
const PHDR_SIZE = 56;
const SHDR_SIZE = 64;
export const PT_LOAD = 1;
export const PT_NOTE = 4;
const SHT_NOTE = 7;
export const XEN_ELFNOTE_PHYS32_ENTRY = 18;

export interface ElfLoadSegment {
  /** Physical load address (p_paddr). */
  paddr: number;
  fileOffset: number;
  fileSize: number;
  memSize: number;
}

export interface ElfNote {
  name: string;
  type: number;
  desc: Uint8Array;
}

export interface ElfImage {
  entry: number;
  segments: ElfLoadSegment[];
  /** XEN_ELFNOTE_PHYS32_ENTRY, when the kernel carries it. */
  pvhEntry: number | undefined;
}

function u64(dv: DataView, off: number, what: string): number {
  const v = dv.getBigUint64(off, true);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw kernelInvalid(`ELF ${what} ${hex(v)} is out of range`);
  return Number(v);
}

/** True when [off, off+len) is inside a buffer of `total` bytes (no overflow). */
function within(off: number, len: number, total: number): boolean {
  return off >= 0 && len >= 0 && off <= total && len <= total - off;
}

export function isElf(image: Uint8Array): boolean {
  return image.length >= 4 && image[0] === 0x7f && image[1] === 0x45 && image[2] === 0x4c && image[3] === 0x46;
}

/** Walk the notes in `data` (each: namesz, descsz, type, name, desc; 4-byte padded). */
export function parseNotes(data: Uint8Array): ElfNote[] {
  const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const notes: ElfNote[] = [];
  let off = 0;
  while (data.length - off >= 12) {
    const namesz = dv.getUint32(off, true);
    const descsz = dv.getUint32(off + 4, true);
    const type = dv.getUint32(off + 8, true);
    off += 12;
    const namePad = Math.ceil(namesz / 4) * 4;
    const descPad = Math.ceil(descsz / 4) * 4;
    if (!within(off, namePad, data.length) || !within(off + namePad, descsz, data.length)) {
      throw kernelInvalid("ELF note runs past the end of its segment");
    }
    // The name is NUL-terminated; namesz counts the NUL.
    let nameEnd = off;
    while (nameEnd < off + namesz && data[nameEnd] !== 0) nameEnd++;
    const name = String.fromCharCode(...data.subarray(off, nameEnd));
    const descStart = off + namePad;
    notes.push({ name, type, desc: data.subarray(descStart, descStart + descsz) });
    off = Math.min(data.length, descStart + descPad);
  }
  return notes;
}

function pvhEntryFrom(notes: readonly ElfNote[]): number | undefined {
  const note = notes.find((n) => n.name === "Xen" && n.type === XEN_ELFNOTE_PHYS32_ENTRY);
  if (note === undefined) return undefined;
  const dv = new DataView(note.desc.buffer, note.desc.byteOffset, note.desc.byteLength);
  // Linux emits it as .long (newer) or as a native pointer (older 64-bit builds).
  if (note.desc.length === 4) return dv.getUint32(0, true);
  if (note.desc.length === 8) {
    const v = dv.getBigUint64(0, true);
    if (v >= 0x1_0000_0000n) throw kernelInvalid(`PVH entry ${hex(v)} is not a 32-bit physical address`);
    return Number(v);
  }
  throw kernelInvalid(`PVH entry note has a ${note.desc.length}-byte value (expected 4 or 8)`);
}

export function parseElf(image: Uint8Array): ElfImage {
  if (image.length < EHDR_SIZE) throw kernelInvalid(`ELF file is ${image.length} bytes, shorter than its 64-byte header`);
  if (!isElf(image)) throw kernelInvalid("no ELF magic");
  if (image[4] !== ELFCLASS64) throw kernelInvalid("ELF is not 64-bit (EI_CLASS)");
  if (image[5] !== ELFDATA2LSB) throw kernelInvalid("ELF is not little-endian (EI_DATA)");
  if (image[6] !== EV_CURRENT) throw kernelInvalid("ELF version is not 1");
  const dv = new DataView(image.buffer, image.byteOffset, image.byteLength);
  if (dv.getUint16(16, true) !== ET_EXEC) throw kernelInvalid("ELF is not an executable (e_type)");
  if (dv.getUint16(18, true) !== EM_X86_64) throw kernelInvalid("ELF is not for x86-64 (e_machine)");
  const entry = u64(dv, 24, "e_entry");
  const phoff = u64(dv, 32, "e_phoff");
  const shoff = u64(dv, 40, "e_shoff");
  const phentsize = dv.getUint16(54, true);
  const phnum = dv.getUint16(56, true);
  const shentsize = dv.getUint16(58, true);
  const shnum = dv.getUint16(60, true);
  if (phnum === 0) throw kernelInvalid("ELF has no program headers");
  if (phentsize !== PHDR_SIZE) throw kernelInvalid(`ELF program header size is ${phentsize}, expected 56`);
  if (!within(phoff, phnum * PHDR_SIZE, image.length)) throw kernelInvalid("ELF program headers lie outside the file (truncated?)");

  const segments: ElfLoadSegment[] = [];
  const notes: ElfNote[] = [];
  for (let i = 0; i < phnum; i++) {
    const ph = phoff + i * PHDR_SIZE;
    const type = dv.getUint32(ph, true);
    if (type !== PT_LOAD && type !== PT_NOTE) continue;
    const fileOffset = u64(dv, ph + 8, "p_offset");
    const paddr = u64(dv, ph + 24, "p_paddr");
    const fileSize = u64(dv, ph + 32, "p_filesz");
    const memSize = u64(dv, ph + 40, "p_memsz");
    if (!within(fileOffset, fileSize, image.length)) {
      throw kernelInvalid(`ELF segment ${i} [${hex(fileOffset)}, +${hex(fileSize)}) lies outside the ${image.length}-byte file (truncated?)`);
    }
    if (type === PT_NOTE) {
      notes.push(...parseNotes(image.subarray(fileOffset, fileOffset + fileSize)));
      continue;
    }
    if (fileSize > memSize) throw kernelInvalid(`ELF segment ${i} has p_filesz > p_memsz`);
    if (!Number.isSafeInteger(paddr + memSize)) throw kernelInvalid(`ELF segment ${i} end is out of range`);
    if (memSize > 0) segments.push({ paddr, fileOffset, fileSize, memSize });
  }
  if (segments.length === 0) throw kernelInvalid("ELF has no PT_LOAD segment");

  let pvhEntry = pvhEntryFrom(notes);
  // Fall back to SHT_NOTE sections when the note is not in a PT_NOTE segment.
  if (pvhEntry === undefined && shnum > 0 && shoff !== 0) {
    if (shentsize !== SHDR_SIZE) throw kernelInvalid(`ELF section header size is ${shentsize}, expected 64`);
    if (!within(shoff, shnum * SHDR_SIZE, image.length)) throw kernelInvalid("ELF section headers lie outside the file (truncated?)");
    const sectionNotes: ElfNote[] = [];
    for (let i = 0; i < shnum; i++) {
      const sh = shoff + i * SHDR_SIZE;
      if (dv.getUint32(sh + 4, true) !== SHT_NOTE) continue;
      const off = u64(dv, sh + 24, "sh_offset");
      const size = u64(dv, sh + 32, "sh_size");
      if (!within(off, size, image.length)) throw kernelInvalid(`ELF note section ${i} lies outside the file (truncated?)`);
      sectionNotes.push(...parseNotes(image.subarray(off, off + size)));
    }
    pvhEntry = pvhEntryFrom(sectionNotes);
  }
  if (pvhEntry !== undefined && !segments.some((s) => pvhEntry! >= s.paddr && pvhEntry! < s.paddr + s.memSize)) {
    throw kernelInvalid(`PVH entry ${hex(pvhEntry)} is not inside any loaded segment`);
  }
  return { entry, segments, pvhEntry };
}
