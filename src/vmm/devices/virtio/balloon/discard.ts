import koffi from "koffi";
import { TypevisorError } from "../../../../errors.js";
import { SysError } from "../../../../sys/libc.js";
import type { HostRegion } from "../../../memory/guest-memory.js";
import type { DiscardFn } from "./balloon.js";

/*
 * Giving ballooned guest pages back to the host. Each guest RAM region is one private anonymous
 * mapping (docs/vmm.md), so madvise(MADV_DONTNEED) frees the pages at once and the next access,
 * by the guest (KVM drops its stage-2 mappings through MMU notifiers) or by us, faults in
 * fresh zero pages, as madvise(2) documents for private anonymous mappings. The one place outside
 * GuestMemory that touches the host mapping by address: it never reads or writes it.
 * A shared or file-backed guest memory (memfd, hugetlbfs) would need MADV_REMOVE or
 * fallocate(PUNCH_HOLE) instead; DONTNEED would only drop this process's mapping of the pages.
 */
const libc = koffi.load("libc.so.6");
const madviseFn = libc.func("int madvise(uintptr_t addr, size_t len, int advice)");
const sysconfFn = libc.func("long sysconf(int name)");

export const MADV_DONTNEED = 4;
const SC_PAGESIZE = 30;

/** The host's base page size: madvise needs page-aligned addresses. */
export const HOST_PAGE_SIZE: number = Number(sysconfFn(SC_PAGESIZE) as number | bigint);

/**
 * A discard function for the balloon: drops the host pages behind guest range [gpa, gpa+len).
 * `regions` are guest RAM's regions and their host mappings (the device thread's init.memory).
 *
 * The range must lie inside one region (else BALLOON_DISCARD_RANGE); it is shrunk inwards to
 * whole host pages, so bytes outside it are never dropped. madvise failure throws SysError.
 * @throws TypevisorError BALLOON_DISCARD_RANGE when the layout itself is unusable
 */
export function makeDiscard(layout: readonly HostRegion[]): DiscardFn {
  const regions = layout.map((r) => {
    if (![r.guestPhysAddr, r.size, r.hostAddress].every((v) => Number.isSafeInteger(v) && v >= 0) || r.size === 0) {
      throw new TypevisorError("BALLOON_DISCARD_RANGE", `guest memory region at 0x${r.guestPhysAddr.toString(16)} is malformed`);
    }
    // Each region is its own mapping; madvise needs page-aligned host addresses.
    if (r.hostAddress === 0 || r.hostAddress % HOST_PAGE_SIZE !== 0) {
      throw new TypevisorError("BALLOON_DISCARD_RANGE", `guest memory region at 0x${r.guestPhysAddr.toString(16)} has host address 0x${r.hostAddress.toString(16)}, not a page-aligned mapping`);
    }
    return { guestPhysAddr: r.guestPhysAddr, size: r.size, hostAddress: r.hostAddress };
  });
  const page = BigInt(HOST_PAGE_SIZE);
  return (gpa: number, len: number): void => {
    if (!Number.isSafeInteger(gpa) || !Number.isSafeInteger(len) || gpa < 0 || len < 0) {
      throw new TypevisorError("BALLOON_DISCARD_RANGE", `discard of ${len} bytes at 0x${gpa.toString(16)} is not a valid range`);
    }
    if (len === 0) return;
    const r = regions.find((x) => gpa >= x.guestPhysAddr && gpa + len <= x.guestPhysAddr + x.size);
    if (r === undefined) {
      throw new TypevisorError("BALLOON_DISCARD_RANGE", `discard of ${len} bytes at 0x${gpa.toString(16)} is outside guest RAM`);
    }
    const host = BigInt(r.hostAddress + (gpa - r.guestPhysAddr));
    const start = ((host + page - 1n) / page) * page;
    const end = ((host + BigInt(len)) / page) * page;
    if (end <= start) return;
    if ((madviseFn(start, end - start, MADV_DONTNEED) as number) !== 0) throw new SysError("madvise(MADV_DONTNEED)", koffi.errno());
  };
}
