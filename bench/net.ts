/**
 * bench/net: TCP throughput between guest and host over virtio-net on a TAP,
 * typevisor against QEMU (`-M q35 -accel kvm`, virtio-net-pci, tap netdev
 * without vhost — we have no vhost either), same guest, inside one lab run.
 * Guest side: busybox nc; host side: Node's TCP server on the TAP's address,
 * which times guest->host itself; host->guest is timed in the guest.
 *
 * Run: npm run bench:net
 */
import { execFileSync } from "node:child_process";
import { SYNC_TIMEOUT_MS } from "../test/helpers/sync-timeout.js";
import { readFileSync } from "node:fs";
import { createServer, type Server } from "node:net";
import { runScriptArg } from "../src/images/guest-init.js";
import { imagePaths } from "../src/images/image.js";
import { ConsoleProcess } from "../test/helpers/console-process.js";
import { compare, counterDelta, cpuDelta, formatCpu, kvmCounters, mountDebugfs, nodePerfArgs, perfAttach, threadTicks } from "./lib.js";

const RUNS = Number(process.env["BENCH_RUNS"] ?? 3);
const MIB = 32;
const BYTES = MIB * 1024 * 1024;
const TAP = "tvbench0";
const HOST = "169.254.20.1";
const GUEST = "169.254.20.2";
const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;

interface Result {
  toHostMBs: number;
  toGuestMBs: number;
  /** CPU seconds by thread name over host->guest (MARK0..MARK1, incl. a 2 s pause). */
  cpu: Record<string, number>;
  /** CPU seconds of this process (the host's TCP sender) over the same span. */
  senderCpu: number;
  /** Same span: the TAP's own counters (its tx is what the guest received), KVM's, and the guest's interrupts per virtio vector. */
  tap: Record<string, number>;
  kvm: Record<string, number>;
  irqs: Record<string, number>;
}

/** The host TAP's statistics (tx_* = frames handed to the VMM's reader, i.e. to the guest). */
const TAP_KEYS = ["tx_packets", "tx_bytes", "tx_dropped", "rx_packets", "rx_bytes"];
function tapCounters(): Map<string, number> {
  return new Map(TAP_KEYS.map((k) => [k, Number(readFileSync(`/sys/class/net/${TAP}/statistics/${k}`, "utf8").trim())]));
}

/** The guest's /proc/interrupts virtio lines printed as "TAG count ... name" (1 vCPU): count by vector name. */
function guestIrqs(out: string, tag: string): Map<string, number> {
  const m = new Map<string, number>();
  for (const line of out.matchAll(new RegExp(`^${tag} +\\d+: +(\\d+) .* (\\S+)\\r?$`, "gm"))) m.set(line[2]!, Number(line[1]));
  return m;
}

let upload: { start: number; end: number; bytes: number } = { start: 0, end: 0, bytes: 0 };
const payload = Buffer.alloc(BYTES, 0x5a);

function servers(): Promise<Server[]> {
  const send = createServer((s) => s.end(payload));
  const recv = createServer((s) => {
    upload = { start: performance.now(), end: 0, bytes: 0 };
    s.on("data", (d: Buffer) => {
      upload.bytes += d.length;
      if (upload.bytes >= BYTES) {
        upload.end = performance.now();
        s.end();
      }
    });
  });
  return Promise.all([send, recv].map((srv, i) => new Promise<Server>((r) => srv.listen(6000 + i, HOST, () => r(srv)))));
}

const SCRIPT = [
  `ip addr add ${GUEST}/24 dev eth0`,
  "ip link set eth0 up",
  `ping -c 1 -W 5 ${HOST} >/dev/null`,
  // Untimed warm-up, the same for both VMMs (as in bench/disk): our receive path is compiled by
  // V8 during its first megabytes (perf showed V8's compiler threads taking a quarter of the
  // VMM's CPU in an unwarmed host->guest run); a long-running VM pays that once. One download was
  // not enough to reach steady state in the lab (ours measured 36-37 MB/s after one, 43 after three).
  ...Array.from({ length: 3 }, () => `nc ${HOST} 6000 >/dev/null`),
  // MARKs bound host->guest for BENCH_PERF (perf takes a moment to attach: the sleep is untimed).
  // The guest's interrupt counts around the measured download (virtio vectors only).
  "grep virtio /proc/interrupts | sed 's/^/IRQ0 /'",
  "echo MARK0; sleep 2",
  `busybox time nc ${HOST} 6000 2>&1 >/dev/null | grep real | sed 's/^/D: /'`,
  "grep virtio /proc/interrupts | sed 's/^/IRQ1 /'",
  "echo MARK1",
  `dd if=/dev/zero bs=1M count=${MIB} 2>/dev/null | nc ${HOST} 6001`,
].join("; ");

async function once(cmd: string, args: string[]): Promise<Result> {
  const p = new ConsoleProcess(cmd, args);
  try {
    const pid = p.child.pid;
    if (pid === undefined) throw new Error(`${cmd} did not start`);
    const at = await p.waitFor(/MARK0\r?\n/, 0, 600_000);
    const before = threadTicks(pid);
    const tap0 = tapCounters();
    const kvm0 = kvmCounters(pid);
    const sender = process.cpuUsage();
    const stopPerf = perfAttach(pid, `${cmd.endsWith("qemu-system-x86_64") ? "qemu" : "typevisor"} host->guest`);
    await p.waitFor(/MARK1\r?\n/, at, 600_000);
    const cpu = cpuDelta(before, threadTicks(pid));
    const used = process.cpuUsage(sender);
    const tap = counterDelta(tap0, tapCounters());
    const kvm = counterDelta(kvm0, kvmCounters(pid));
    const senderCpu = (used.user + used.system) / 1e6;
    const report = stopPerf();
    await p.waitFor(/typevisor-guest: exit/, 0, 600_000);
    await report();
    const m = /D: real\s+(\d+)m ([\d.]+)s/.exec(p.output);
    if (m === null || upload.end === 0) throw new Error(`incomplete run:\n${p.output.slice(-1500)}`);
    const down = Number(m[1]) * 60 + Number(m[2]);
    const irqs = counterDelta(guestIrqs(p.output, "IRQ0"), guestIrqs(p.output, "IRQ1"));
    return { toGuestMBs: BYTES / down / 1e6, toHostMBs: BYTES / ((upload.end - upload.start) / 1000) / 1e6, cpu, senderCpu, tap, kvm, irqs };
  } finally {
    p.kill();
  }
}

async function main(): Promise<void> {
  const img = imagePaths("minimal");
  execFileSync("ip", ["tuntap", "add", "dev", TAP, "mode", "tap"], { timeout: SYNC_TIMEOUT_MS });
  execFileSync("ip", ["addr", "add", `${HOST}/24`, "dev", TAP], { timeout: SYNC_TIMEOUT_MS });
  execFileSync("ip", ["link", "set", TAP, "up"], { timeout: SYNC_TIMEOUT_MS });
  const srv = await servers();
  if (!mountDebugfs()) console.log("bench/net: no KVM debugfs here, KVM counters left out");
  const cmdline = `console=ttyS0 panic=-1 quiet ${runScriptArg(SCRIPT)}`;
  const ours = [...nodePerfArgs(), BIN, "run", "--no-lab", "--no-reboot", "--image", "minimal", "--memory", "512", "--net", `tap=${TAP}`, "--cmdline", cmdline,
    // a control socket, so a lab watchdog that finds this run stalled gets the VMM's GET /threads (docs/lab.md)
    "--api-socket", `/tmp/tv-bench-net-${process.pid}.sock`];
  const qemu = [
    "-name", "debug-threads=on", "-M", "q35", "-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", "512",
    "-nographic", "-nodefaults", "-no-user-config", "-serial", "stdio", "-no-reboot",
    "-kernel", img.kernel, "-initrd", img.initrd, "-append", cmdline,
    "-netdev", `tap,id=n0,ifname=${TAP},script=no,downscript=no,vhost=off`, "-device", "virtio-net-pci,netdev=n0",
  ];
  const res: { typevisor: Result[]; qemu: Result[] } = { typevisor: [], qemu: [] };
  console.log(`bench/net: ${RUNS} runs each, alternating; ${MIB} MiB each way over TCP, guest 512 MiB, 1 vCPU`);
  try {
    for (let i = 0; i < RUNS; i++) {
      const a = await once(process.execPath, ours);
      res.typevisor.push(a);
      const b = await once("qemu-system-x86_64", qemu);
      res.qemu.push(b);
      const f = (x: Result) => `guest->host ${x.toHostMBs.toFixed(1)} MB/s, host->guest ${x.toGuestMBs.toFixed(1)} MB/s`;
      console.log(`run ${i + 1}: typevisor ${f(a)} | qemu ${f(b)}`);
      // The host's TCP sender (this process) shares the lab's one CPU with both.
      const c = (x: Result) => `${formatCpu(x.cpu)}; sender ${x.senderCpu.toFixed(2)}`;
      console.log(`  cpu s (host->guest incl. 2 s pause) typevisor ${c(a)} | qemu ${c(b)}`);
      // Frames and interrupts per measured download: what a slow run does more of.
      const e = (x: Result) => [x.tap, x.irqs, x.kvm].map((o) => Object.entries(o).filter(([, v]) => v !== 0).map(([n, v]) => `${n} ${v}`).join(", ")).join(" | ");
      console.log(`  tap | guest irqs | kvm (host->guest) typevisor ${e(a)}`);
      console.log(`  tap | guest irqs | kvm (host->guest) qemu ${e(b)}`);
    }
  } finally {
    for (const s of srv) s.close();
    execFileSync("ip", ["link", "del", TAP], { timeout: SYNC_TIMEOUT_MS });
  }
  for (const [k, label] of [["toHostMBs", "TCP guest->host (MB/s)"], ["toGuestMBs", "TCP host->guest (MB/s)"]] as const) {
    console.log(compare(label, res.typevisor.map((r) => r[k]), res.qemu.map((r) => r[k])));
  }
  console.log(JSON.stringify({ bench: "net", date: new Date().toISOString(), runs: RUNS, results: res }));
}

await main();
