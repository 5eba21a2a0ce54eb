/**
 * Killed at any moment: a child process (the built code in dist/, as a VMM runs it) opens an
 * overlay over a qcow2 base read-write and does writes, write-zeroes, discards and flushes in a
 * loop until it is SIGKILLed: by the parent at a random moment, or by itself right before its
 * n-th metadata write or sync (a random moment misses the narrow windows between ordered
 * steps; this does not). Three children in turn on each image. Afterwards:
 * - `qemu-img check` finds at most leaked clusters (exit 0 or 3; never 2, corruption, nor 1);
 * - everything the child had flushed reads back, through our reader and through QEMU's
 *   (`qemu-img convert -O raw`), unless an operation after that flush touched it (whose effect
 *   may or may not have landed) or it was discarded (what a discarded range reads is unspecified,
 *   virtio 1.2 §5.2.6.2);
 * - the image opens read-write again and keeps working (leaks stay leaks, nothing worse).
 *
 * Both processes derive the operations from (seed, index) with the same function (its source is
 * written into the child's script), and data from `pattern(len, pos, index + 1)`, so the parent
 * rebuilds what the disk must hold from the child's last "FLUSHED n" line alone.
 */
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import { backendFromInit, openDisk } from "../open.js";
import { io, pattern, qemuCheck, qemuImg, readAll } from "../test-disk.js";
import { createQcow2 } from "./create.js";

const MiB = 1024 * 1024;
/** Fixed seeds by default (kill moments still vary with timing); QCOW2_CRASH_SEED explores others. */
const SEED_OFFSET = Number(process.env.QCOW2_CRASH_SEED ?? 0) * 100;
const dir = mkdtempSync(join(tmpdir(), "tv-qcow2-crash-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const distOpen = new URL("../../../../dist/vmm/disk/open.js", import.meta.url);
const distTestDisk = new URL("../../../../dist/vmm/disk/test-disk.js", import.meta.url);
const distMetaIo = new URL("../../../../dist/vmm/disk/qcow2/io.js", import.meta.url);

interface CrashOp {
  kind: "write" | "zero" | "discard" | "flush";
  pos: number;
  len: number;
}

/**
 * Operation `i` of run `seed` on a disk of `size` bytes with `cluster`-byte clusters. Self-contained
 * (no imports, no closures): its source text is the child's copy.
 */
function opAt(seed: number, i: number, size: number, cluster: number): CrashOp {
  let s = (Math.imul(seed, 0x9e3779b1) ^ Math.imul(i + 1, 0x85ebca6b)) >>> 0;
  const rnd = (): number => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const k = rnd();
  const kind = k < 0.62 ? "write" : k < 0.75 ? "zero" : k < 0.87 ? "discard" : "flush";
  const sectors = size / 512;
  let sector = Math.floor(rnd() * sectors);
  // Mostly small requests, some up to 256 KiB; half of them whole clusters (the paths that deallocate and that batch).
  let n = 1 + Math.floor(rnd() ** 3 * 512);
  if (rnd() < 0.5) {
    const per = cluster / 512;
    sector = Math.floor(sector / per) * per;
    n = Math.max(per, Math.round(n / per) * per);
  }
  n = Math.min(n, sectors - sector);
  return { kind, pos: sector * 512, len: n * 512 };
}

const childSource = `import { writeSync } from "node:fs";
import { backendFromInit, openDisk } from ${JSON.stringify(distOpen.href)};
import { MetaIo } from ${JSON.stringify(distMetaIo.href)};
import { io, pattern } from ${JSON.stringify(distTestDisk.href)};
${opAt.toString()}
const [path, seed, size, cluster, killAt] = [process.argv[2], ...process.argv.slice(3).map(Number)];
const disk = openDisk(path, { format: "qcow2", readonly: false });
const b = backendFromInit(disk.init);
if (killAt > 0) {
  // Die right before the killAt-th metadata write or sync: every step of the ordering gets its turn.
  let n = 0;
  for (const name of ["write", "sync"]) {
    const real = MetaIo.prototype[name];
    MetaIo.prototype[name] = function (...args) {
      if (++n === killAt) process.kill(process.pid, "SIGKILL");
      return real.apply(this, args);
    };
  }
}
writeSync(1, "READY\\n");
for (let i = 0; ; i++) {
  const o = opAt(seed, i, size, cluster);
  writeSync(1, "OP " + i + "\\n");
  const r = o.kind === "write" ? io(b, pattern(o.len, o.pos, i + 1), o.pos, true)
    : o.kind === "zero" ? b.writeZeroes(o.pos, o.len)
    : o.kind === "discard" ? b.discard(o.pos, o.len)
    : b.flush();
  if (r !== 0) { writeSync(1, "FAIL " + i + " " + r + "\\n"); process.exit(1); }
  if (o.kind === "flush") writeSync(1, "FLUSHED " + (i + 1) + "\\n");
}
`;

/** How a child dies: SIGKILLed by the parent `ms` after it has the image open, or by itself before its `at`-th metadata write or sync. */
type Kill = { ms: number } | { at: number };

/** Run the child on `img` until it is killed; its output lines. */
function runAndKill(script: string, img: string, seed: number, size: number, cluster: number, kill: Kill): Promise<{ lines: string[]; stderr: string }> {
  // A child that never reaches its `at`-th metadata call is killed after a while all the same.
  const delayMs = "ms" in kill ? kill.ms : 1500;
  return new Promise((done, fail) => {
    const child = spawn(process.execPath, [script, img, String(seed), String(size), String(cluster), String("at" in kill ? kill.at : 0)], { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    let timer: NodeJS.Timeout | undefined;
    const guard = setTimeout(() => child.kill("SIGKILL"), 20_000);
    child.stdout.setEncoding("utf8").on("data", (d: string) => {
      out += d;
      if (timer === undefined && out.includes("READY\n")) timer = setTimeout(() => child.kill("SIGKILL"), delayMs);
    });
    child.stderr.setEncoding("utf8").on("data", (d: string) => (err += d));
    child.on("error", fail);
    child.on("close", (code, signal) => {
      clearTimeout(guard);
      if (timer !== undefined) clearTimeout(timer);
      if (signal !== "SIGKILL") fail(new Error(`the child ended by itself (code ${code}, signal ${signal}): ${out.slice(-500)} ${err}`));
      else done({ lines: out.split("\n").filter((l) => l.length > 0), stderr: err });
    });
  });
}

describe("an overlay killed at any moment", () => {
  const baseRaw = pattern(4 * MiB, 0, 77);
  const runs: { clusterBits: number; refcountOrder: number; seed: number }[] = [];
  // 64 KiB, 4 KiB and 512 B clusters; 64-bit refcounts at 512 B make the refcount table grow within a run.
  for (const [clusterBits, refcountOrder] of [[16, 4], [12, 0], [9, 6]] as const) {
    for (const k of [1, 2, 3, 4]) runs.push({ clusterBits, refcountOrder, seed: clusterBits * 1000 + k + SEED_OFFSET });
  }

  it("the built code is there (npm test builds it before vitest)", () => {
    expect(existsSync(fileURLToPath(distOpen)), `${fileURLToPath(distOpen)} is missing: run npm run build`).toBe(true);
  });

  for (const { clusterBits, refcountOrder, seed } of runs) {
    const cluster = 2 ** clusterBits;
    const size = 8 * MiB;
    // Three children in turn on the same image: one killed 10..300 ms after it opened it, two
    // right before their 1st..250th metadata write or sync (where a misordered step would show).
    const kills: Kill[] = [{ ms: 10 + ((seed * 7919) % 291) }, { at: 1 + ((seed * 104729) % 250) }, { at: 1 + ((seed * 1299709) % 250) }];
    const when = kills.map((k) => ("ms" in k ? `${k.ms} ms` : `metadata call ${k.at}`)).join(", ");
    it(`${cluster} B clusters, ${2 ** refcountOrder}-bit refcounts, seed ${seed}, killed at ${when}: at most leaks, and every flushed write reads back`, async () => {
      const run = join(dir, `run-${seed}`);
      rmSync(run, { recursive: true, force: true });
      mkdirSync(run);
      writeFileSync(join(run, "base.raw"), baseRaw);
      qemuImg(["convert", "-f", "raw", "-O", "qcow2", join(run, "base.raw"), join(run, "base.qcow2")]);
      const img = join(run, "overlay.qcow2");
      createQcow2(img, { size, clusterBits, refcountOrder, backing: { file: "base.qcow2", format: "qcow2" } });
      const script = join(run, "child.mjs");
      writeFileSync(script, childSource);
      // What the disk held when the child opened it: the base (then zeros), later what the last kill left.
      let before: Buffer = Buffer.alloc(size);
      baseRaw.copy(before);
      const tableClusters = () => readFileSync(img).readUInt32BE(56);
      const tablesAtStart = tableClusters();
      const told: string[] = [];

      for (const [session, kill] of kills.entries()) {
        const childSeed = seed * 10 + session;
        const { lines, stderr } = await runAndKill(script, img, childSeed, size, cluster, kill);
        expect(lines.filter((l) => l.startsWith("FAIL")), stderr).toEqual([]);
        expect(lines[0], stderr).toBe("READY");
        const flushed = Math.max(0, ...lines.filter((l) => l.startsWith("FLUSHED ")).map((l) => Number(l.slice(8))));
        const started = Math.max(-1, ...lines.filter((l) => l.startsWith("OP ")).map((l) => Number(l.slice(3))));

        const check = qemuCheck(img);
        expect([0, 3], JSON.stringify(check.report)).toContain(check.status);

        // What must be there: what the child found, then every operation up to its last flush; what
        // may be anything: discarded ranges, and whatever an operation after that flush touched.
        const model = Buffer.from(before);
        const known = Buffer.alloc(size, 1);
        for (let i = 0; i < flushed; i++) {
          const o = opAt(childSeed, i, size, cluster);
          if (o.kind === "write") {
            pattern(o.len, o.pos, i + 1).copy(model, o.pos);
            known.fill(1, o.pos, o.pos + o.len);
          } else if (o.kind === "zero") {
            model.fill(0, o.pos, o.pos + o.len);
            known.fill(1, o.pos, o.pos + o.len);
          } else if (o.kind === "discard") known.fill(0, o.pos, o.pos + o.len);
        }
        for (let i = flushed; i <= started; i++) {
          const o = opAt(childSeed, i, size, cluster);
          if (o.kind !== "flush") known.fill(0, o.pos, o.pos + o.len);
        }
        const expectMatches = (got: Buffer, who: string) => {
          expect(got.length).toBe(size);
          for (let p = 0; p < size; p++) {
            if (known[p] === 1 && got[p] !== model[p]) throw new Error(`${who}: byte ${p} is ${got[p]}, not ${model[p]} (flushed ${flushed} of ${started + 1} operations started)`);
          }
        };

        const d = openDisk(img, { format: "qcow2", readonly: true });
        const b = backendFromInit(d.init);
        const ours = readAll(b, 0, size);
        b.close();
        d.close();
        expectMatches(ours, "our reader");
        const raw = join(run, "after.raw");
        qemuImg(["convert", "-f", "qcow2", "-O", "raw", img, raw]);
        const theirs = readFileSync(raw);
        expectMatches(theirs, "qemu-img convert");
        // Where the model has no say, both readers still see the same disk.
        expect(ours.equals(theirs)).toBe(true);
        before = ours;
        // A child that killed itself did so inside an operation (a timed kill may land before the first one).
        if ("at" in kill) expect(started, "operations the child started").toBeGreaterThanOrEqual(0);
        told.push(`${"ms" in kill ? `${kill.ms} ms` : `call ${kill.at}`}: ${flushed}/${started + 1} ops flushed, check ${check.status} (${check.report.leaks ?? 0} leaks)`);
      }

      // The crashed image keeps working: write, close, still at most leaks, and it reads back.
      const w = openDisk(img, { format: "qcow2", readonly: false });
      const wb = backendFromInit(w.init);
      const data = pattern(3 * cluster + 1024, 5 * cluster - 512, seed);
      expect(io(wb, data, 5 * cluster - 512, true)).toBe(0);
      expect(wb.flush()).toBe(0);
      wb.close();
      w.close();
      const again = qemuCheck(img);
      expect([0, 3], JSON.stringify(again.report)).toContain(again.status);
      const r = openDisk(img, { format: "qcow2", readonly: true });
      const rb = backendFromInit(r.init);
      expect(readAll(rb, 5 * cluster - 512, data.length).equals(data)).toBe(true);
      rb.close();
      r.close();
      console.log(`crash, ${cluster} B clusters, seed ${seed}: ${told.join("; ")}; refcount table ${tablesAtStart} -> ${tableClusters()} clusters`);
      rmSync(run, { recursive: true, force: true });
    }, 60_000);
  }
});
