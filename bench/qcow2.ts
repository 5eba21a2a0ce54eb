/**
 * bench/qcow2: the qcow2 code itself, without a guest: our backend (src/vmm/disk/qcow2, the code
 * the disk's I/O thread or the device thread runs) against QEMU's block layer driven by its own
 * `qemu-img bench` (qcow2 driver, `-t writeback -i threads`, queue depth 1), on the same kind of
 * image: a fresh overlay (64 KiB clusters, made by our createQcow2) on a sparse 1 GiB raw base,
 * in /dev/shm (tmpfs: the file system costs the same for both, and little). Phases, 1 MiB requests
 * over the first BENCH_QCOW2_MIB (512) MiB: sequential writes that allocate every cluster (the
 * metadata work of a fresh overlay), the same writes again (clusters allocated: in place), and
 * sequential reads. Ours runs one untimed pass first on another overlay (V8 compiles the hot
 * paths; QEMU's code is compiled already). What bench/disk measures through a guest, this
 * measures without one: where a guest figure differs, the difference is not the format's code.
 *
 * Run: npm run bench:qcow2 (in the lab), or after `tsc -p tsconfig.bench.json`:
 * node dist-bench/bench/qcow2.js (on this host). BENCH_RUNS (3), BENCH_QCOW2_MIB (512).
 */
import { execFileSync } from "node:child_process";
import { closeSync, existsSync, mkdtempSync, openSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { addressOf, IoVec } from "../src/sys/iov.js";
import { ftruncate } from "../src/sys/libc.js";
import { backendFromInit, openDisk } from "../src/vmm/disk/open.js";
import { createQcow2 } from "../src/vmm/disk/qcow2/create.js";
import { compare } from "./lib.js";

const RUNS = Number(process.env["BENCH_RUNS"] ?? 3);
const MIB = Number(process.env["BENCH_QCOW2_MIB"] ?? 512);
const REQ = 1024 * 1024;
const PHASES = ["write, allocating", "write, allocated", "read"] as const;
type Phase = (typeof PHASES)[number];

const dir = mkdtempSync(join(existsSync("/dev/shm") ? "/dev/shm" : tmpdir(), "tvbench-qcow2-"));
const base = join(dir, "base.raw");

/** A fresh overlay on the sparse base. */
function overlay(name: string): string {
  const p = join(dir, name);
  rmSync(p, { force: true });
  createQcow2(p, { size: 1024 * REQ, backing: { file: base, format: "raw" } });
  return p;
}

/** MB/s of each phase through our backend (one 1 MiB buffer per request, as `qemu-img bench` has). */
function ours(img: string): Record<Phase, number> {
  const opened = openDisk(img, { format: "qcow2", readonly: false });
  const b = backendFromInit(opened.init);
  const buf = Buffer.alloc(REQ, 0x5a);
  const at = addressOf(buf);
  const iov = new IoVec();
  const out = {} as Record<Phase, number>;
  try {
    for (const phase of PHASES) {
      const write = phase !== "read";
      const t0 = performance.now();
      for (let pos = 0; pos < MIB * REQ; pos += REQ) {
        iov.clear();
        // Safe: `buf` is off V8's heap (never moved) and read after the call (below); the call touches only its REQ bytes.
        iov.push(at, REQ);
        const r = write ? b.writev(iov, pos) : b.readv(iov, pos);
        // Read after the call: `buf` stays reachable while the backend (JavaScript that allocates: a GC may run) uses its address.
        if (r < 0 || buf.length !== REQ) throw new Error(`${phase} at ${pos}: errno ${-r}`);
      }
      if (write && b.flush() < 0) throw new Error("flush failed");
      out[phase] = (MIB * REQ) / 1e6 / ((performance.now() - t0) / 1000);
    }
  } finally {
    b.close();
    opened.close();
  }
  return out;
}

/** MB/s of each phase through `qemu-img bench` ("Run completed in S seconds": the requests only, not its start). */
function qemu(img: string): Record<Phase, number> {
  const out = {} as Record<Phase, number>;
  for (const phase of PHASES) {
    const args = ["bench", "-f", "qcow2", "-c", String(MIB), "-s", String(REQ), "-d", "1", "-t", "writeback", "-i", "threads", ...(phase !== "read" ? ["-w", "--pattern=90"] : []), img];
    const text = execFileSync("qemu-img", args, { encoding: "utf8", timeout: 600_000 });
    const s = Number(/Run completed in ([\d.]+) seconds/.exec(text)?.[1]);
    if (!Number.isFinite(s)) throw new Error(`qemu-img bench said: ${text}`);
    out[phase] = (MIB * REQ) / 1e6 / s;
  }
  return out;
}

function main(): void {
  const fd = openSync(base, "w");
  if (ftruncate(fd, 1024 * REQ) < 0) throw new Error("cannot size the base");
  closeSync(fd);
  try {
    ours(overlay("warm.qcow2"));
    const series = { ours: [] as Record<Phase, number>[], qemu: [] as Record<Phase, number>[] };
    for (let run = 1; run <= RUNS; run++) {
      const a = ours(overlay(`ours${run}.qcow2`));
      const q = qemu(overlay(`qemu${run}.qcow2`));
      series.ours.push(a);
      series.qemu.push(q);
      console.log(`run ${run}: ${PHASES.map((p) => `${p} ${a[p].toFixed(0)}/${q[p].toFixed(0)}`).join(", ")} MB/s (typevisor/QEMU)`);
      rmSync(join(dir, `ours${run}.qcow2`));
      rmSync(join(dir, `qemu${run}.qcow2`));
    }
    console.log(`qcow2 backend, ${MIB} MiB in 1 MiB requests on tmpfs, ${RUNS} runs (medians, MB/s):`);
    for (const p of PHASES) console.log(`  ${compare(p, series.ours.map((x) => x[p]), series.qemu.map((x) => x[p]), 0)}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

main();
