/**
 * The daemon's API against a real daemon and real VMM processes: tiny
 * purpose-built guests on this host's /dev/kvm (PVM runs them; stock kernels
 * are proven in the lab, test/control/daemon.lab.test.ts).
 */
import { unixApi } from "../helpers/unix-api.js";
import { parseStatsPage } from "../../src/vmm/stats/layout.js";
import { contextSwitches, threadNamed } from "../helpers/thread-wakeups.js";
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, symlinkSync, writeFileSync } from "node:fs";
import { request } from "node:http";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ApiError } from "../../src/api/client.js";
import { homePaths, vmPaths } from "../../src/control/paths.js";
import { Store } from "../../src/control/store.js";
import { TINY_KERNEL_BANNER, TINY_KERNEL_KEYS, writeTinyKernel } from "../helpers/tiny-kernel.js";
import { outcome } from "../helpers/thrown.js";
import { startDaemon, until, type TestDaemon } from "../helpers/daemon.js";
import { vmmProcesses } from "../helpers/vmm-processes.js";
import { qemuCheck } from "../../src/vmm/disk/test-disk.js";

const hasKvm = existsSync("/dev/kvm");
const built = existsSync(new URL("../../dist/cli/main.js", import.meta.url));
if (hasKvm && !built) throw new Error("run `npm run build` first: the daemon and VMM run from dist/");

/** A raw request, to send what the typed client never would. */
function raw(socketPath: string, method: string, path: string, body?: string, headers: Record<string, string> = {}): Promise<{ status: number; type: string; json: Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, method, path, headers: { ...(body !== undefined ? { "content-type": "application/json" } : {}), ...headers } }, (res) => {
      let data = "";
      res.on("data", (d: Buffer) => (data += d.toString()));
      res.on("end", () => {
        let json: Record<string, unknown> = {};
        try {
          json = JSON.parse(data) as Record<string, unknown>;
        } catch {
          /* not JSON */
        }
        resolve({ status: res.statusCode ?? 0, type: String(res.headers["content-type"] ?? ""), json });
      });
    });
    req.on("error", reject);
    req.end(body);
  });
}

describe.skipIf(!hasKvm)("daemon API with real VMM processes (tiny guests)", () => {
  let d: TestDaemon;
  let kernel: string;
  let imagesHome: string;
  const spec = (name: string, extra: Record<string, unknown> = {}) => ({ name, kernel, memoryMiB: 64, rng: false, ...extra });

  beforeAll(async () => {
    const dir = mkdtempSync(join(tmpdir(), "tvk-"));
    kernel = join(dir, "tiny.bin");
    writeTinyKernel(kernel);
    // An image whose root filesystem is junk: growing it fails after the VM's directory exists.
    imagesHome = join(dir, "data");
    mkdirSync(join(imagesHome, "images", "broken"), { recursive: true });
    writeTinyKernel(join(imagesHome, "images", "broken", "vmlinuz"));
    writeFileSync(join(imagesHome, "images", "broken", "rootfs.ext4"), Buffer.alloc(65536, 0x5a));
    // A real (small) ext4 root filesystem, for disks made from an image.
    mkdirSync(join(imagesHome, "images", "small"), { recursive: true });
    writeTinyKernel(join(imagesHome, "images", "small", "vmlinuz"));
    execFileSync("mkfs.ext4", ["-q", "-F", join(imagesHome, "images", "small", "rootfs.ext4"), "8M"], { timeout: 60_000 });
    // a secret in the daemon's environment that no VMM should inherit
    d = await startDaemon({ args: ["--force-kvm", "--allow-files", dir], env: { TYPEVISOR_HOME: imagesHome, TV_TEST_SECRET: "hunter2" } });
  }, 30_000);

  afterAll(async () => {
    if (d === undefined) return;
    for (const vm of await d.client.listVms().catch(() => [])) {
      if (vm.pid !== undefined) {
        try {
          process.kill(vm.pid, "SIGKILL");
        } catch {
          /* gone */
        }
      }
    }
    await d.stop();
  });

  it("serves an OpenAPI 3.1 document generated from the request schemas", async () => {
    const doc = await d.client.openapi();
    expect(doc["openapi"]).toBe("3.1.0");
    const paths = doc["paths"] as Record<string, Record<string, { requestBody?: { content: Record<string, { schema: { properties?: Record<string, unknown>; additionalProperties?: boolean } }> } }>>;
    expect(Object.keys(paths)).toEqual(expect.arrayContaining(["/v1/vms", "/v1/vms/{name}", "/v1/vms/{name}/stop", "/v1/host", "/v1/events", "/metrics"]));
    const create = paths["/v1/vms"]!["post"]!.requestBody!.content["application/json"]!.schema;
    expect(Object.keys(create.properties ?? {})).toEqual(expect.arrayContaining(["name", "image", "cpus", "memoryMiB", "diskSize", "restart"]));
    expect(create.additionalProperties).toBe(false);
  });

  it("answers bad requests with 4xx problem+json, never 5xx, and creates nothing", async () => {
    const cases: [string, string, string | undefined, number][] = [
      ["POST", "/v1/vms", JSON.stringify({ name: "a", kernel, cpus: "two" }), 400],
      ["POST", "/v1/vms", JSON.stringify({ name: "a", kernel, colour: "blue" }), 400],
      ["POST", "/v1/vms", JSON.stringify({ name: "../etc", kernel }), 400],
      ["POST", "/v1/vms", JSON.stringify({ name: "a/b", kernel }), 400],
      ["POST", "/v1/vms", JSON.stringify({ name: "a", kernel, memoryMiB: 1e12 }), 400],
      ["POST", "/v1/vms", JSON.stringify({ name: "a", kernel, diskSize: "999999T" }), 400],
      ["POST", "/v1/vms", JSON.stringify({ name: "a", kernel, diskSize: -5 }), 400],
      ["POST", "/v1/vms", JSON.stringify({ name: "a", kernel: "relative/path" }), 400],
      ["POST", "/v1/vms", JSON.stringify({ name: "a", kernel: "/no/such/kernel" }), 403],
      ["POST", "/v1/vms", JSON.stringify({ name: "a", image: "nope" }), 400],
      ["POST", "/v1/vms", JSON.stringify({ name: "a" }), 400],
      ["POST", "/v1/vms", "{not json", 400],
      ["POST", "/v1/vms", JSON.stringify({ name: "a", kernel, cmdline: "x".repeat(70_000) }), 413],
      ["POST", "/v1/vms", JSON.stringify([1, 2]), 400],
      ["POST", "/v1/vms?start=maybe", JSON.stringify({ name: "a", kernel }), 400],
      ["GET", "/v1/vms/nope", undefined, 404],
      ["GET", "/v1/vms/..%2Fx", undefined, 400],
      ["POST", "/v1/vms/nope/start", undefined, 404],
      ["POST", "/v1/vms/nope/stop", JSON.stringify({ force: "yes" }), 400],
      ["GET", "/v1/nothing", undefined, 404],
      ["GET", "/v1/events?after=-1", undefined, 400],
      ["GET", "/v1/vms?x=1", undefined, 400],
    ];
    for (const [method, path, body, status] of cases) {
      const r = await raw(d.socket, method, path, body);
      expect({ method, path, status: r.status }).toEqual({ method, path, status });
      expect(r.type).toContain("application/problem+json");
      expect(typeof r.json["code"]).toBe("string");
      expect(String(r.json["detail"]).length).toBeGreaterThan(5);
    }
    // A CPU request past the budget (host CPUs × the default overcommit 4) says what is free.
    const cpus = (await d.client.host()).cpu.budget + 1;
    const r = await raw(d.socket, "POST", "/v1/vms", JSON.stringify({ name: "big", kernel, cpus }));
    expect(r.status).toBe(409);
    expect(r.json["code"]).toBe("INSUFFICIENT_RESOURCES");
    expect(String(r.json["detail"])).toMatch(/free/);
    // Failing halfway (the image's junk root filesystem cannot be grown) leaves nothing behind.
    const broken = await raw(d.socket, "POST", "/v1/vms", JSON.stringify({ name: "broken", image: "broken", diskSize: "1M" }));
    expect(broken.status).toBe(422);
    expect(await d.client.listVms()).toEqual([]);
    expect(readdirSync(join(d.home, "vms"))).toEqual([]);
  });

  it("disks from an image are qcow2 linked clones on one shared read-only base, which goes with the last VM on it; raw on request", async () => {
    const big = await d.client.createVm({ name: "clone-a", image: "small", diskSize: "4G", memoryMiB: 64 });
    const disk = big.disks[0]!;
    expect(disk).toMatchObject({ format: "qcow2", sizeBytes: 4 * 2 ** 30, image: "small" });
    // Instant and small whatever the size: the overlay holds metadata only.
    expect(disk.allocatedBytes).toBeLessThan(2 ** 20);
    expect(disk.backing).toMatch(new RegExp(`^${d.home}/bases/[0-9a-f]{16}-${4 * 2 ** 30}\\.raw$`));
    expect(qemuCheck(disk.path).status).toBe(0);
    const info = JSON.parse(execFileSync("qemu-img", ["info", "--output=json", disk.path], { encoding: "utf8" })) as Record<string, unknown>;
    expect(info).toMatchObject({ "virtual-size": 4 * 2 ** 30, "backing-filename": disk.backing, "backing-filename-format": "raw" });
    // The base's filesystem fills the disk: grown once, for every VM of that image and size.
    const sb = execFileSync("dumpe2fs", ["-h", disk.backing!], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] });
    const field = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+)`, "m").exec(sb)?.[1]);
    expect(field("Block count") * field("Block size")).toBe(4 * 2 ** 30);
    const twin = await d.client.createVm({ name: "clone-b", image: "small", diskSize: "4G", memoryMiB: 64 });
    expect(twin.disks[0]!.backing).toBe(disk.backing);
    const copy = await d.client.createVm({ name: "copy", image: "small", diskFormat: "raw", memoryMiB: 64 });
    expect(copy.disks[0]).toMatchObject({ format: "raw", sizeBytes: 8 * 2 ** 20 });
    expect(copy.disks[0]!.backing).toBeUndefined();
    await d.client.removeVm("clone-a");
    expect(existsSync(disk.backing!)).toBe(true);
    await d.client.removeVm("clone-b");
    expect(existsSync(disk.backing!)).toBe(false);
    await d.client.removeVm("copy");
  });

  it("never answers 5xx to random request bodies (fast-check)", async () => {
    const field = fc.oneof(
      fc.jsonValue(),
      fc.string(),
      fc.integer(),
      fc.double(),
      fc.constantFrom("", "..", "/", "a/b", "x".repeat(200), "2G", "-1", "1e400", kernel, "/no/such", "minimal", "on-crash"),
    );
    const body = fc.record(
      { name: field, kernel: field, image: field, cpus: field, memoryMiB: field, diskSize: field, nets: field, restart: field, rng: field, cmdline: field, extra: field },
      { requiredKeys: [] },
    );
    await fc.assert(
      fc.asyncProperty(fc.oneof(body, fc.jsonValue()), fc.constantFrom("POST /v1/vms", "POST /v1/vms/x/stop", "GET /v1/vms/x"), async (b, route) => {
        const [method, path] = route.split(" ") as [string, string];
        const r = await raw(d.socket, method, path, method === "GET" ? undefined : JSON.stringify(b));
        expect(r.status).toBeLessThan(500);
        if (r.status >= 400) expect(r.type).toContain("application/problem+json");
        if (r.status === 201) await d.client.removeVm(String(r.json["name"]), { force: true });
      }),
      { numRuns: 300 },
    );
  }, 60_000);

  it("boots only kernels under --allow-files: any other host path is refused the same way whether it exists or not", async () => {
    const outside = mkdtempSync(join(tmpdir(), "tv-outside-"));
    writeTinyKernel(join(outside, "real-kernel"));
    // a symlink inside the allowed directory that points out of it
    symlinkSync("/etc/passwd", join(dirname(kernel), "escape"));
    // a FIFO inside it: refused at once (opened without blocking), not a daemon waiting for a writer
    execFileSync("mkfifo", [join(dirname(kernel), "fifo")]);
    const answers: string[] = [];
    for (const k of ["/etc/shadow", "/etc/passwd", join(outside, "real-kernel"), "/nonexistent/kernel", join(dirname(kernel), "escape"), join(dirname(kernel), "missing"), join(dirname(kernel), "fifo")]) {
      const r = await raw(d.socket, "POST", "/v1/vms", JSON.stringify(spec(`p${answers.length}`, { kernel: k })));
      expect(r.status, k).toBe(403);
      expect(r.json["code"]).toBe("PATH_NOT_ALLOWED");
      answers.push(String(r.json["detail"]).replace(k, "PATH"));
    }
    // one answer for all: nothing to learn about what exists on the host
    expect(new Set(answers).size).toBe(1);
    expect((await d.client.listVms()).filter((v) => /^p\d$/.test(v.name))).toEqual([]);
  });

  it("runs a VM through its lifecycle: create, start, console, pause, resume, reboot, stop, start, remove", async () => {
    const c = d.client;
    const created = await c.createVm(spec("life", { diskSize: "8M" }));
    expect(created.state).toBe("defined");
    expect(created.disks[0]!.sizeBytes).toBe(8 * 2 ** 20);
    expect(await outcome(c.createVm(spec("life")))).toBe("409 VM_EXISTS");
    expect(await outcome(c.pauseVm("life"))).toBe("409 VM_STATE");

    const running = await c.startVm("life");
    expect(running.state).toBe("running");
    expect(running.pid).toBeGreaterThan(0);
    await until("banner", async () => (await c.console("life")).toString().includes(TINY_KERNEL_BANNER) || undefined);
    // The VMM gets only the environment it needs, not the daemon's (tokens, credentials, NODE_OPTIONS).
    const environ = readFileSync(`/proc/${running.pid}/environ`, "utf8").split("\0").filter((kv) => kv !== "");
    expect(environ.map((kv) => kv.split("=")[0]).sort()).toEqual(["PATH", "TYPEVISOR_VM_ID"]);

    // Interactive console: typed bytes reach the guest's UART and its echo comes back.
    const con = await c.attachConsole("life");
    let seen = "";
    con.on("data", (b: Buffer) => (seen += b.toString()));
    con.write("ping-42");
    await until("echo", () => seen.includes("ping-42") || undefined);
    con.destroy();

    expect((await c.pauseVm("life")).state).toBe("paused");
    expect(await outcome(c.pauseVm("life"))).toBe("409 VM_STATE");
    expect((await c.resumeVm("life")).state).toBe("running");
    await c.rebootVm("life");
    await until("second banner", async () => (await c.console("life")).toString().split(TINY_KERNEL_BANNER).length >= 3 || undefined);

    // The daemon's first sample of a VMM can come as the VMM starts (the jail reports its pid
    // before Node runs), with 0 CPU ticks, and in this test of about a second it can still be the
    // latest (seen once in a full run, 2026-12-05): wait for a sample that counted some, and if
    // none comes, say which process the daemon sampled and what the kernel says of it.
    let last: unknown;
    const stats = await until("usage sample with CPU time", async () => {
      const v = await c.vmStats("life");
      last = { usage: v.usage, pid: (await c.getVm("life")).pid };
      return v.usage !== undefined && v.usage.cpuSeconds > 0 ? v.usage : undefined;
    }).catch((e: Error) => {
      const pid = (last as { pid?: number } | undefined)?.pid;
      const stat = pid === undefined ? "" : readFileSync(`/proc/${pid}/stat`, "utf8");
      throw new Error(`${e.message}: last ${JSON.stringify(last)}; /proc/${pid ?? "?"}/stat: ${stat}`);
    });
    expect(stats.memoryBytes).toBeGreaterThan(0);
    expect(stats.cpuSeconds).toBeGreaterThan(0);
    const metrics = await c.metrics();
    expect(metrics).toMatch(/typevisor_vm_state\{vm="life",state="running"\} 1/);
    expect(metrics).toMatch(/typevisor_vm_memory_bytes\{vm="life"\} \d+/);
    expect(metrics).toMatch(/typevisor_host_resource\{resource="memory",kind="capacity"\} \d+/);

    expect(await outcome(c.removeVm("life"))).toBe("409 VM_STATE");
    const stopped = await c.stopVm("life");
    expect(stopped.state).toBe("stopped");
    expect(stopped.lastExit?.result).toBe("stopped");
    expect((await c.startVm("life")).state).toBe("running");
    await c.removeVm("life", { force: true });
    expect(await outcome(c.getVm("life"))).toBe("404 VM_NOT_FOUND");
    expect(readdirSync(join(d.home, "vms"))).toEqual([]);

    const types = (await c.events({ vm: "life" })).map((e) => e.type);
    expect(types).toEqual(expect.arrayContaining(["vm.created", "vm.starting", "vm.running", "vm.paused", "vm.resumed", "vm.rebooted", "vm.stopping", "vm.stopped", "vm.removed"]));
  }, 60_000);

  it("records a guest power-off as stopped and a guest crash as crashed", async () => {
    const c = d.client;
    await c.createVm(spec("off"), { start: true });
    await until("banner", async () => (await c.console("off")).toString().includes(TINY_KERNEL_BANNER) || undefined);
    const con = await c.attachConsole("off");
    con.write(Buffer.of(TINY_KERNEL_KEYS.POWEROFF));
    await until("stopped", async () => (await c.getVm("off")).state === "stopped" || undefined);
    con.destroy();
    expect((await c.getVm("off")).lastExit?.result).toBe("poweroff");

    await c.startVm("off");
    await until("banner again", async () => (await c.console("off")).toString().split(TINY_KERNEL_BANNER).length >= 3 || undefined);
    const con2 = await c.attachConsole("off");
    con2.write(Buffer.of(TINY_KERNEL_KEYS.CRASH));
    await until("crashed", async () => (await c.getVm("off")).state === "crashed" || undefined);
    con2.destroy();
    expect((await c.getVm("off")).lastExit?.result).toBe("crash");
    await c.removeVm("off");
  }, 40_000);

  it("records a VMM that dies while starting as crashed, with its reason, and stays manageable", async () => {
    const c = d.client;
    const junk = join(dirname(kernel), "junk");
    writeFileSync(junk, Buffer.alloc(4096, 0x90));
    await c.createVm({ name: "junk", kernel: junk, memoryMiB: 64 });
    const err = await c.startVm("junk").catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ApiError);
    expect((err as ApiError).code).toBe("VM_START_FAILED");
    expect((err as ApiError).message).toMatch(/kernel/i);
    const vm = await c.getVm("junk");
    expect(vm.state).toBe("crashed");
    expect(vm.lastExit?.result).toBe("error");
    await c.removeVm("junk");
  }, 30_000);

  it("checks an idle VMM's health less often while its answers stay the same: not every 2 s", async () => {
    const c = d.client;
    await c.createVm(spec("calm"), { start: true });
    const checks = async (): Promise<number> => Number(/typevisor_vm_health_checks\{vm="calm"\} (\d+)/.exec(await c.metrics())?.[1] ?? NaN);
    // Waits of 2, 4 and 8 s: by 14 s the checks are 8 s apart.
    await new Promise((r) => setTimeout(r, 14_000));
    const a = await checks();
    expect(a).toBeGreaterThanOrEqual(2);
    await new Promise((r) => setTimeout(r, 16_000));
    // Every 2 s would be 8 more; every 8 s, 2 (3 at a window's edges).
    expect((await checks()) - a).toBeLessThanOrEqual(3);
    // Still watched: a VMM stopped as a whole is found unresponsive (the next test, in full).
    await c.removeVm("calm", { force: true });
  }, 60_000);

  it("checks a VMM at once when its stats page counts a change, backed off or not", async () => {
    const c = d.client;
    await c.createVm(spec("woken"), { start: true });
    const vm = await c.getVm("woken");
    const checks = async (): Promise<number> => Number(/typevisor_vm_health_checks\{vm="woken"\} (\d+)/.exec(await c.metrics())?.[1] ?? NaN);
    // Backed off to 8 s by now (waits of 2, 4, 8 s); then right after a check, the next is 8 s away.
    await new Promise((r) => setTimeout(r, 14_000));
    const a = await checks();
    await until("a check", async () => ((await checks()) > a ? true : undefined), 10_000);
    const b = await checks();
    // Paused behind the daemon's back (its own API socket): the VMM counts the change in its page.
    expect((await unixApi(vm.apiSocket!, "POST", "/pause")).status).toBeLessThan(300);
    const t0 = performance.now();
    await until("the check the change brings", async () => ((await checks()) > b ? true : undefined), 10_000);
    // The watchdog ticks every 2 s; without the page the check came 8 s after the last.
    expect(performance.now() - t0).toBeLessThan(3500);
    await unixApi(vm.apiSocket!, "POST", "/resume");
    await c.removeVm("woken", { force: true });
  }, 60_000);

  it("samples a VM's I/O from its stats page: sampling every second wakes neither the VMM's main thread nor its device thread", async () => {
    const c = d.client;
    await c.createVm(spec("paged", { rng: true }), { start: true });
    const vm = await c.getVm("paged");
    const devices = await until("the device thread", async () => threadNamed(vm.pid!, "tv-devices"), 20_000);
    await until("a usage sample with I/O", async () => ((await c.vmStats("paged")).usage?.diskReadBytes !== undefined ? true : undefined), 20_000);
    // The page is the VMM's: set up (no disk or NIC counts into it: the tiny guest has none), started.
    const page = parseStatsPage(readFileSync(vmPaths(d.home, vm.id).statsFile));
    expect(page).toMatchObject({ disks: [], nics: [], totals: { diskReadBytes: 0, netTxBytes: 0 } });
    expect(page!.startedAtMs).toBeGreaterThan(0);
    // Samples every second (the test daemon's --usage-interval 1), each of which asked the VMM
    // GET /stats: its main thread switched 14-17 times in 4 s, most of it for those requests (a
    // health check, every 8 s by now, is 3-4); now the daemon reads the page. Measured past the
    // device thread's own timed work (its malloc trim 10 s after the start).
    await new Promise((r) => setTimeout(r, 12_000));
    const a = [contextSwitches(vm.pid!), contextSwitches(vm.pid!, devices)];
    await new Promise((r) => setTimeout(r, 4000));
    expect(contextSwitches(vm.pid!) - a[0]!).toBeLessThanOrEqual(8);
    expect(contextSwitches(vm.pid!, devices) - a[1]!).toBeLessThanOrEqual(1);
    expect((await c.vmStats("paged")).usage).toMatchObject({ diskReadBytes: 0, netRxBytes: 0 });
    await c.removeVm("paged", { force: true });
  }, 60_000);

  it("marks a VMM that stops answering unresponsive (event, VmInfo), without slowing the others, and clears it when it answers again", async () => {
    const c = d.client;
    await c.createVm(spec("hang-a"), { start: true });
    await c.createVm(spec("hang-b"), { start: true });
    const a = await c.getVm("hang-a");
    const after = (await c.events()).at(-1)?.seq ?? 0;
    process.kill(a.pid!, "SIGSTOP"); // a VMM stuck as a whole: its API cannot answer
    try {
      const stuck = await until("hang-a unresponsive", async () => {
        const v = await c.getVm("hang-a");
        return v.unresponsive !== undefined ? v : undefined;
      }, 20_000);
      expect(stuck.state).toBe("running");
      expect((await c.events({ after })).some((e) => e.type === "vm.unresponsive" && e.vm === "hang-a")).toBe(true);
      // the daemon and the other VM answer at once meanwhile
      const t0 = performance.now();
      expect((await c.getVm("hang-b")).unresponsive).toBeUndefined();
      expect(performance.now() - t0).toBeLessThan(1000);
    } finally {
      process.kill(a.pid!, "SIGCONT");
    }
    await until("hang-a answers again", async () => ((await c.getVm("hang-a")).unresponsive === undefined ? true : undefined), 20_000);
    expect((await c.events({ after })).some((e) => e.type === "vm.responsive" && e.vm === "hang-a")).toBe(true);
    for (const n of ["hang-a", "hang-b"]) await c.removeVm(n, { force: true });
  }, 60_000);

  it("isolates VMs: SIGKILL of one VMM marks only that VM crashed; on-crash restarts it", async () => {
    const c = d.client;
    await c.createVm(spec("iso-a"), { start: true });
    await c.createVm(spec("iso-b"), { start: true });
    await c.createVm(spec("iso-r", { restart: "on-crash" }), { start: true });
    const a = await c.getVm("iso-a");
    const b = await c.getVm("iso-b");
    const follow = c.followEvents({ after: (await c.events()).at(-1)?.seq ?? 0 });
    process.kill(a.pid!, "SIGKILL");
    const crashed = await until("crash event", async () => {
      const { value } = await follow.next();
      return value?.type === "vm.crashed" && value.vm === "iso-a" ? value : undefined;
    });
    await follow.return(undefined);
    expect(crashed.message).toMatch(/SIGKILL/);
    expect((await c.getVm("iso-a")).state).toBe("crashed");
    // a VMM killed outright leaves its sockets; the daemon removes them
    for (const ext of ["api", "con"]) expect(existsSync(join(d.home, "run", `${a.id}.${ext}`)), ext).toBe(false);
    const bAfter = await c.getVm("iso-b");
    expect(bAfter.state).toBe("running");
    expect(bAfter.pid).toBe(b.pid);
    process.kill(b.pid!, 0); // still alive: throws if not

    const r = await c.getVm("iso-r");
    process.kill(r.pid!, "SIGKILL");
    const restarted = await until("automatic restart", async () => {
      const v = await c.getVm("iso-r");
      return v.state === "running" && v.pid !== r.pid ? v : undefined;
    });
    expect(restarted.restarts).toBe(1);
    for (const n of ["iso-a", "iso-b", "iso-r"]) await c.removeVm(n, { force: true });
    for (const v of [a, b, restarted]) for (const ext of ["api", "con"]) expect(existsSync(join(d.home, "run", `${v.id}.${ext}`))).toBe(false);
  }, 60_000);

  it("re-attaches running VMs after the daemon is killed with SIGKILL, without losing or duplicating any", async () => {
    await d.client.createVm(spec("keep-1"), { start: true });
    await d.client.createVm(spec("keep-2"), { start: true });
    await d.client.pauseVm("keep-2");
    await d.client.createVm(spec("gone"), { start: true });
    await d.client.createVm(spec("idle"));
    await d.client.createVm(spec("half"));
    const before = await d.client.listVms();
    await d.stop("SIGKILL");
    // A daemon killed between "starting" and the VMM's spawn leaves an active VM with no runtime.
    const store = new Store(homePaths(d.home).db);
    store.updateVm("half", { state: "starting", runtime: null });
    store.close();
    // While no daemon watches, one VMM dies.
    process.kill(before.find((v) => v.name === "gone")!.pid!, "SIGKILL");
    await until("gone dead", () => {
      try {
        process.kill(before.find((v) => v.name === "gone")!.pid!, 0);
        return undefined;
      } catch {
        return true;
      }
    });
    d = await startDaemon({ home: d.home, args: ["--force-kvm", "--allow-files", dirname(kernel)], env: { TYPEVISOR_HOME: imagesHome } });
    const after = await d.client.listVms();
    expect(after.map((v) => v.name)).toEqual(before.map((v) => v.name));
    const by = Object.fromEntries(after.map((v) => [v.name, v]));
    expect(by["keep-1"]!.state).toBe("running");
    expect(by["keep-1"]!.pid).toBe(before.find((v) => v.name === "keep-1")!.pid);
    expect(by["keep-2"]!.state).toBe("paused");
    expect(by["gone"]!.state).toBe("crashed");
    expect(by["idle"]!.state).toBe("defined");
    expect(by["half"]!.state).toBe("crashed");
    expect(by["half"]!.lastExit?.reason).toMatch(/died without saying why/);
    const types = (await d.client.events()).map((e) => `${e.type}:${e.vm ?? ""}`);
    expect(types).toEqual(expect.arrayContaining(["vm.reattached:keep-1", "vm.reattached:keep-2", "vm.crashed:gone", "vm.crashed:half"]));
    // The re-attached VMs are fully managed: console, resume and stop work, and a VMM exit is noticed.
    const con = await d.client.attachConsole("keep-1");
    let seen = "";
    con.on("data", (b: Buffer) => (seen += b.toString()));
    con.write("again");
    await until("echo after re-attach", () => seen.includes("again") || undefined);
    con.destroy();
    expect((await d.client.resumeVm("keep-2")).state).toBe("running");
    expect((await d.client.stopVm("keep-2")).state).toBe("stopped");
    process.kill(by["keep-1"]!.pid!, "SIGKILL");
    await until("crash of a re-attached VM noticed", async () => (await d.client.getVm("keep-1")).state === "crashed" || undefined);
    for (const v of after) await d.client.removeVm(v.name, { force: true });
    // No VMM processes of this daemon are left.
    await until("no VMM processes left", () => vmmProcesses(d.home).length === 0 || undefined, 5000);
  }, 90_000);
});
