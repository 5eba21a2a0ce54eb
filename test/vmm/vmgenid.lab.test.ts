/**
 * Lab test (real KVM): clones of one snapshot are new machines to the guest (issue 15, "Clones").
 * A Debian guest with the generic kernel (CONFIG_VMGENID=y; the cloud kernel has no
 * CONFIG_VIRT_DRIVERS) finds the VMGenID device and the Generic Event Device in the DSDT and binds
 * their drivers; it is snapshotted, and two VMMs restored from that one snapshot each see a new
 * generation ID (read through /dev/mem at the address ADDR returns), one GED interrupt (the
 * restore's notification, handled by evged and passed to the vmgenid driver, which reseeds the
 * RNG and logs it), and different bytes from /dev/urandom read after that reseed.
 */
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, describe, expect, it } from "vitest";
import { imagePaths } from "../../src/images/image.js";
import { VMGENID_ADDR, VMGENID_SIZE } from "../../src/vmm/arch/x86_64/layout.js";
import { decodeState, SNAPSHOT_FILES } from "../../src/vmm/snapshot/state.js";
import { ConsoleProcess } from "../helpers/console-process.js";
import { genericKernel } from "../helpers/generic-kernel.js";
import { unixApi } from "../helpers/unix-api.js";

const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;
// eslint-disable-next-line no-control-regex -- ash follows its prompt with ESC[6n (cursor position query)
const PROMPT = /# (?:\x1b\[6n)?$/;
const img = imagePaths("minimal");
const dir = mkdtempSync(join(tmpdir(), "tv-vmgenid-"));
const running: ConsoleProcess[] = [];
afterEach(() => {
  for (const p of running.splice(0)) p.kill();
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function tv(args: string[]): ConsoleProcess {
  const p = new ConsoleProcess(process.execPath, [BIN, "run", "--no-lab", ...args]);
  running.push(p);
  return p;
}

const hex16 = (file: string, skip: string): string => `$(dd if=${file} bs=${VMGENID_SIZE} skip=${skip} count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n')`;
/** What Linux 6.1 logs when the vmgenid driver hands a new ID to the RNG (random.c add_vmfork_randomness). */
const FORK_LOG = "crng reseeded due to virtual machine fork";
/** Wait (up to 10 s) until the kernel has logged the reseed: the driver's notify handler runs on a workqueue. */
const AWAIT_FORK = `i=0; while [ "$(dmesg | grep -c '${FORK_LOG}')" = 0 ] && [ $i -lt 40 ]; do sleep 0.25; i=$((i+1)); done; `;
/**
 * One console line with everything the test reads: the generation ID at the address the DSDT's
 * ADDR names (the low 1 MiB is readable through /dev/mem under STRICT_DEVMEM when it is not RAM),
 * the GED's interrupt count, how often the RNG was reseeded for a VM fork, and 16 bytes of
 * /dev/urandom. The marker is computed by the shell, so the echo of the typed line never matches.
 */
const PROBE =
  `echo "VG$((6*7)) gen=${hex16("/dev/mem", String(VMGENID_ADDR / VMGENID_SIZE))} ` +
  `ged=$(grep ACPI:Ged /proc/interrupts | tr -s ' ' | cut -d' ' -f3) ` +
  `fork=$(dmesg | grep -c '${FORK_LOG}') rnd=${hex16("/dev/urandom", "0")} END"\n`;
const PROBE_LINE = /VG42 gen=([0-9a-f]*) ged=(\d*) fork=(\d+) rnd=([0-9a-f]*) END/;

interface Probe {
  gen: string;
  /** The "ACPI:Ged" count in /proc/interrupts; "" when evged requested no interrupt. */
  ged: string;
  fork: number;
  rnd: string;
}

async function probe(p: ConsoleProcess, from: number, awaitFork: boolean): Promise<Probe> {
  p.type((awaitFork ? AWAIT_FORK : "") + PROBE);
  const at = await p.waitFor(PROBE_LINE, from);
  const m = PROBE_LINE.exec(p.output.slice(from, at))!;
  return { gen: m[1]!, ged: m[2]!, fork: Number(m[3]), rnd: m[4]! };
}

/** The generation ID the snapshot's memory file holds at VMGENID_ADDR. */
function savedGenerationId(snapDir: string): string {
  const state = decodeState(readFileSync(join(snapDir, SNAPSHOT_FILES.state)), snapDir);
  const r = state.memory!.regions.find((x) => x.guestPhysAddr <= VMGENID_ADDR && VMGENID_ADDR + VMGENID_SIZE <= x.guestPhysAddr + x.size)!;
  const at = r.fileOffset + VMGENID_ADDR - r.guestPhysAddr;
  return readFileSync(join(snapDir, SNAPSHOT_FILES.memory)).subarray(at, at + VMGENID_SIZE).toString("hex");
}

describe("VMGenID: every restore of a snapshot is a new machine to the guest", () => {
  it("the guest binds vmgenid and GED; two clones of one snapshot get new IDs, a GED interrupt each, and different /dev/urandom bytes", async () => {
    const kernel = genericKernel();
    expect(kernel, "the lab's generic kernel package should be in the cache").toBeDefined();
    const sock = join(dir, "a.sock");
    const snap = join(dir, "snap");
    // One vCPU: /proc/interrupts then has one count column.
    const a = tv(["--kernel", kernel!, "--initrd", img.initrd, "--cpus", "1", "--memory", "256", "--api-socket", sock]);
    let at = await a.waitFor(PROMPT, 0, 300_000);
    console.log(`vmgenid lab: generic kernel at the prompt after ${a.seconds().toFixed(1)} s`);
    // Markers computed by the shell, so the echo of the typed line never matches.
    a.type("echo LS-$((1+1)); ls -d /sys/bus/acpi/devices/* /sys/bus/*/drivers/vmgenid/VMGENCTR:00 /sys/bus/platform/drivers/acpi-ged/ACPI0013:00; uname -r; dmesg | grep -i -e vmgenid -e acpi-ged -e ACPI0013; echo LS-$((2+1))\n");
    const lsStart = await a.waitFor(/LS-2\r?\n/, at);
    at = await a.waitFor(/LS-3\r?\n/, lsStart);
    const listing = a.output.slice(lsStart, at);
    // The ACPI devices exist and their drivers are bound (Linux 6.1: vmgenid is an ACPI driver on
    // the acpi bus; since 6.10 a platform driver): ls printed the paths, not "No such file".
    expect(listing).toMatch(/\/sys\/bus\/acpi\/devices\/VMGENCTR:00/);
    expect(listing).toMatch(/\/sys\/bus\/acpi\/devices\/ACPI0013:00/);
    expect(listing).toMatch(/\/sys\/bus\/\w+\/drivers\/vmgenid\/VMGENCTR:00/);
    // evged's platform driver is "acpi-ged" (drivers/acpi/evged.c).
    expect(listing).toMatch(/\/sys\/bus\/platform\/drivers\/acpi-ged\/ACPI0013:00/);
    expect(listing).not.toMatch(/No such file|(vmgenid|acpi-ged|ACPI0013).*(fail|error|unable|cannot)|acpi notify handler/i);
    // The generic kernel (it also stands for boot.lab.test.ts's "generic kernel boots" check).
    expect(listing).toMatch(/\n[\d.]+-\d+-amd64\r?\n/);
    const before = await probe(a, at, false);
    // The guest reads the ID the VMM wrote at a cold boot, and no generation change has been announced.
    expect(before.gen).toMatch(/^[0-9a-f]{32}$/);
    expect(before.gen).not.toBe("0".repeat(32));
    expect(before.ged).toBe("0");
    expect(before.fork).toBe(0);

    const r = await unixApi(sock, "POST", "/snapshot", { path: snap });
    expect(r.status, JSON.stringify(r.body)).toBe(200);
    expect(savedGenerationId(snap)).toBe(before.gen);
    a.kill();
    await a.exited;

    const clones: Probe[] = [];
    for (let i = 0; i < 2; i++) {
      const c = tv(["--restore", snap]);
      clones.push(await probe(c, 0, true));
      console.log(`vmgenid lab: clone ${i + 1} answered ${c.seconds().toFixed(1)} s after its VMM started`);
      c.kill();
      await c.exited;
    }
    const [b, c] = clones as [Probe, Probe];
    for (const clone of clones) {
      // A new generation ID, announced by exactly one GED interrupt, which evged turned into
      // Notify(VGEN, 0x80) and the vmgenid driver into one RNG reseed.
      expect(clone.gen).toMatch(/^[0-9a-f]{32}$/);
      expect(clone.gen).not.toBe(before.gen);
      expect(clone.ged).toBe("1");
      expect(clone.fork).toBe(1);
    }
    expect(b.gen).not.toBe(c.gen);
    // What the issue asks: two clones that read /dev/urandom right after the restore get different bytes.
    expect(b.rnd).toMatch(/^[0-9a-f]{32}$/);
    expect(c.rnd).toMatch(/^[0-9a-f]{32}$/);
    expect(b.rnd).not.toBe(c.rnd);
  });
});
