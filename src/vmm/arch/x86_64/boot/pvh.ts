/**
 * struct hvm_start_info for the PVH entry (Xen
 * xen/include/public/arch-x86/hvm/start_info.h; Linux mirrors it in
 * include/xen/interface/hvm/start_info.h), version 1 with the memory map.
 *
 * Layout at PVH_INFO_ADDR (all inside the page below ZERO_PAGE_ADDR):
 *   +0x00 hvm_start_info (56 bytes)
 *   +0x40 hvm_modlist_entry[1] (the initrd, 32 bytes)
 *   +0x80 hvm_memmap_table_entry[] (24 bytes each)
 */
import { PVH_INFO_ADDR, ZERO_PAGE_ADDR } from "../layout.js";
import { bootError } from "./errors.js";
import type { E820Entry } from "./e820.js";

export const XEN_HVM_START_MAGIC_VALUE = 0x336ec578;
export const HVM_START_INFO_VERSION = 1;
export const HVM_START_INFO_SIZE = 56;
export const HVM_MODLIST_ENTRY_SIZE = 32;
export const HVM_MEMMAP_ENTRY_SIZE = 24;
export const PVH_MODLIST_OFFSET = 0x40;
export const PVH_MEMMAP_OFFSET = 0x80;
/** Bytes available from PVH_INFO_ADDR before the zero page. */
export const PVH_INFO_SPACE = ZERO_PAGE_ADDR - PVH_INFO_ADDR;
export const PVH_MEMMAP_MAX = Math.floor((PVH_INFO_SPACE - PVH_MEMMAP_OFFSET) / HVM_MEMMAP_ENTRY_SIZE);

export interface PvhInput {
  cmdlineAddr: number;
  rsdpAddr: number;
  initrd: { addr: number; size: number } | undefined;
  /** e820 types equal XEN_HVM_MEMMAP_TYPE_* (1 RAM, 2 reserved). */
  memmap: readonly E820Entry[];
}

/** Build the start-info page (pure); write it at PVH_INFO_ADDR. */
export function buildPvhStartInfo(input: PvhInput): Uint8Array {
  if (input.memmap.length > PVH_MEMMAP_MAX) {
    throw bootError("KERNEL_INVALID", `PVH memory map has ${input.memmap.length} entries, room for ${PVH_MEMMAP_MAX}`);
  }
  const buf = new Uint8Array(PVH_INFO_SPACE);
  const dv = new DataView(buf.buffer);
  dv.setUint32(0, XEN_HVM_START_MAGIC_VALUE, true); // magic
  dv.setUint32(4, HVM_START_INFO_VERSION, true); // version
  dv.setUint32(8, 0, true); // flags: none (no SIF_* apply outside Xen)
  if (input.initrd !== undefined) {
    dv.setUint32(12, 1, true); // nr_modules
    dv.setBigUint64(16, BigInt(PVH_INFO_ADDR + PVH_MODLIST_OFFSET), true); // modlist_paddr
    const m = PVH_MODLIST_OFFSET;
    dv.setBigUint64(m, BigInt(input.initrd.addr), true); // paddr
    dv.setBigUint64(m + 8, BigInt(input.initrd.size), true); // size
    // cmdline_paddr 0: the module has no command line; reserved 0.
  }
  dv.setBigUint64(24, BigInt(input.cmdlineAddr), true); // cmdline_paddr
  dv.setBigUint64(32, BigInt(input.rsdpAddr), true); // rsdp_paddr
  dv.setBigUint64(40, BigInt(PVH_INFO_ADDR + PVH_MEMMAP_OFFSET), true); // memmap_paddr
  dv.setUint32(48, input.memmap.length, true); // memmap_entries
  input.memmap.forEach((e, i) => {
    const off = PVH_MEMMAP_OFFSET + i * HVM_MEMMAP_ENTRY_SIZE;
    dv.setBigUint64(off, BigInt(e.addr), true);
    dv.setBigUint64(off + 8, BigInt(e.size), true);
    dv.setUint32(off + 16, e.type, true);
  });
  return buf;
}
