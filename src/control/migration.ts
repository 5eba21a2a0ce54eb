/**
 * Live migration between two daemons (issue 17, "Daemon"; docs/migration.md, "Between daemons").
 *
 * `vm migrate NAME --to https://PEER` on the source daemon (A): A asks the destination daemon (B)
 * over B's HTTPS API (B's certificate pinned, an operator token of B's) to prepare the VM; B makes
 * an inventory row in state `incoming` and starts a `run --incoming` VMM listening on the address
 * A reached it on; A asks its own VMM to send the VM there (POST /migrate). The VMM stream is TLS
 * with one-time certificates, each daemon pinning the other's fingerprint (migration-tls.ts,
 * vmm/migration/transport.ts). The VMM protocol guarantees one running guest (the source commits
 * only after READY; the destination runs only after GO); this module keeps the two inventories
 * agreeing with it.
 *
 * Ownership, and what each daemon does on (re)start in each state:
 *
 *   A's row      B's row     owner  meaning
 *   running      -           A      before; or after a failed migration (A reverts)
 *   migrating    -           A      A has written its plan (migration.json), B not asked yet / said no
 *   migrating    incoming    A      B prepared a VMM that waits for or is receiving the stream
 *   migrating    running     B      B's VMM runs the guest (it got GO); A drops its row once B says so
 *   -            running     B      done
 *
 *   A restarts, row `migrating`, its VMM alive: it asks the VMM (GET /migrate) and goes on watching;
 *     no migration there (A died before asking it): B is told to drop its row, A's row is running again.
 *   A restarts, row `migrating`, its VMM gone: exit result `migrated` (the VMM had B's RUNNING) or
 *     not, A asks B: B running → A drops its row; B absent → A's row is crashed (the guest ended
 *     before it moved: the disk is A's again); B incoming → B is told to drop it first.
 *   A's VMM says the destination took the VM without confirming (MIGRATION_UNKNOWN; the guest is
 *     paused at A): A asks B until it answers: running → A ends its VMM and drops its row; absent
 *     (B's VMM is dead: B says absent only once it is) → A resumes the guest, row running.
 *   B restarts, row `incoming`: its VMM answers on its API socket (it exists only once the VM runs
 *     there) → the row becomes running; else the VMM is ended and the row dropped (A's VMM then
 *     sees the stream cut before GO, or no RUNNING after it, and the guest runs on at A).
 *   B's incoming VMM exits: the row is dropped (a VM that arrived has a running row first).
 *   B asked about an incoming row (status, abort) whose VMM answers: the row becomes running
 *     first (awaitArrival's poll may lag the VMM), so B never says "waiting" of a guest it runs.
 *
 * A is always the one that removes its row, and only after B said its row is running (or that B
 * has none and A's VMM never handed the guest over): a VM is never in neither inventory, and
 * never running in both. While both have a row, A's says `migrating` and B's says where it is.
 *
 * Disks: on storage both see, B opens the same files, which must lie under one of B's
 * --allow-files directories. A keeps the ids of VMs that left in `<home>/migrated-away`, so its
 * start-up sweep does not take their disks from its pools. With `--copy-disks` (raw or qcow2), B's
 * row names files in its own VM directory, the incoming VMM creates them and the source VMM sends
 * their contents in the stream (`disks: "copy"`); A's files go with A's row once B runs the VM.
 */
import { randomBytes } from "node:crypto";
import { appendFileSync, existsSync, mkdirSync, readFileSync, realpathSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { createServer, isIP } from "node:net";
import { join, sep } from "node:path";
import type { Logger } from "pino";
import { z } from "zod";
import { TypevisorError } from "../errors.js";
import { VmmClient } from "../engine/vmm-client.js";
import { copyFile } from "node:fs/promises";
import { createQcow2 } from "../vmm/disk/qcow2/create.js";
import { imagePaths } from "../images/dirs.js";
import { parseManifest } from "../images/manifest.js";
import type { VmmLaunch } from "../engine/native.js";
import { relayIncoming, relayOutgoing, type Relay } from "./migration-relay.js";
import { oneTimeCertificate } from "./migration-tls.js";
import { homePaths, vmPaths } from "./paths.js";
import { vmSpec, type VmState } from "./spec.js";
import type { DiskRow, VmRow } from "./store.js";
import type { Store } from "./store.js";

/** A fault-injection seam for tests: the daemon dies (SIGKILL) at the named step (TYPEVISOR_CRASH_AT). */
function crashPoint(step: string): void {
  if (process.env["TYPEVISOR_CRASH_AT"] === step) process.kill(process.pid, "SIGKILL");
}

export const migrateSpec = z
  .object({
    to: z.string().url().max(2048).describe("the destination daemon's API URL: https://HOST:PORT"),
    peerToken: z.string().min(1).max(4096).describe("an API token of the destination daemon with the operator or admin role"),
    peerFingerprint: z.string().max(200).optional().describe("the destination daemon's HTTPS certificate SHA-256 fingerprint (what `typevisor host` shows there); else its certificate must chain to a system CA"),
    maxDowntimeMs: z.number().int().min(1).max(3_600_000).optional(),
    copyDisks: z.boolean().default(false).describe("copy the VM's disks into the destination daemon's own directory while the VM runs (a qcow2 disk becomes a standalone qcow2 image there); without it the disks must be on storage both daemons see"),
  })
  .strict();
export type MigrateInput = z.input<typeof migrateSpec>;

/** What the source daemon sends the destination's POST /v1/migrations/incoming. */
export const incomingSpec = z
  .object({
    migrationId: z.string().regex(/^[0-9a-f]{24}$/),
    vmId: z.string().regex(/^[0-9a-f]{12}$/),
    spec: vmSpec,
    disks: z.array(z.object({ path: z.string().min(1).max(4096).startsWith("/"), format: z.enum(["raw", "qcow2"]), sizeBytes: z.number().int().min(0), chain: z.array(z.string().max(4096)).max(64).optional(), backing: z.string().max(4096).optional() }).strict()).max(16),
    sourceFingerprint: z.string().regex(/^([0-9A-F]{2}:){31}[0-9A-F]{2}$/),
    /** The disks' contents come in the stream: the destination makes its own files for them (its default pool), `disks` gives their sizes and formats only. */
    copyDisks: z.boolean().optional(),
  })
  .strict();

export const incomingAnswer = z.object({ endpoint: z.string(), fingerprint: z.string() });
export const incomingState = z.object({ migrationId: z.string(), state: z.enum(["waiting", "running", "absent"]), vm: z.string().optional() });

export const migrationStatus = z.object({
  vm: z.string(),
  to: z.string(),
  phase: z.enum(["preparing", "connecting", "precopy", "stopped", "committed", "confirming", "completed", "failed", "cancelled"]),
  /** The source VMM's progress (GET /migrate), once it has started. */
  vmm: z.record(z.string(), z.unknown()).optional(),
  error: z.string().optional(),
  startedAt: z.string(),
  endedAt: z.string().optional(),
});
export type MigrationStatus = z.infer<typeof migrationStatus>;

/** The plan a daemon keeps in the VM's directory (0600: it holds the peer's token). */
interface Plan {
  role: "source" | "destination";
  id: string;
  /** source: how to reach B. */
  peer?: { url: string; token: string; fingerprint?: string };
  maxDowntimeMs?: number;
  /** source: the disks go in the stream (`disks: "copy"`). */
  copyDisks?: boolean;
  /** destination: set once the VM runs here. */
  arrived?: boolean;
  startedAt: string;
}

/** The destination daemon's API as the source uses it (api/client.ts TypevisorClient; given by the daemon: control does not import the API layer). */
export interface PeerApi {
  prepareIncoming(body: z.input<typeof incomingSpec>): Promise<z.infer<typeof incomingAnswer>>;
  incomingStatus(migrationId: string): Promise<z.infer<typeof incomingState>>;
  abortIncoming(migrationId: string): Promise<z.infer<typeof incomingState>>;
}
export type PeerConnector = (peer: { host: string; port: number; token: string; fingerprint?: string }) => PeerApi;

/** What the manager lends this module (its private parts, as snapshots.ts gets them). */
export interface MigrationHost {
  home: string;
  log: Logger;
  store: Store;
  sandboxed: boolean;
  allowedDirs: string[];
  /** Where image names resolve (typevisor image build). */
  imagesHome: string | undefined;
  startTimeoutMs: number;
  serial<T>(name: string, fn: () => Promise<T>): Promise<T>;
  row(name: string): VmRow;
  event(type: string, vm: string | undefined, message: string, data?: Record<string, unknown>): void;
  setState(name: string, to: VmState): void;
  /** Start `run --incoming` for the row `name` (state incoming); tracked like any VMM (jailed when the daemon sandboxes its VMMs). */
  startIncoming(name: string, incoming: NonNullable<VmmLaunch["incoming"]>): Promise<{ pid: number; alive: () => boolean }>;
  /** Whether the row's VMM process lives, and a promise of its end. */
  vmm(id: string): { alive: boolean; died: Promise<unknown> } | undefined;
  kill(pid: number): void;
  /** How to reach a peer daemon (undefined: this daemon cannot be a migration's source). */
  peer: PeerConnector | undefined;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export class Migrations {
  private readonly status = new Map<string, MigrationStatus>();
  /** Sandboxed VMMs' streams this daemon carries (migration-relay.ts), by VM id. */
  private readonly relays = new Map<string, Relay>();

  private endRelay(id: string): void {
    this.relays.get(id)?.close();
    this.relays.delete(id);
  }

  constructor(private readonly h: MigrationHost) {}

  private planFile(r: { id: string }): string {
    return join(vmPaths(this.h.home, r.id).dir, "migration.json");
  }

  private readPlan(r: { id: string }): Plan | undefined {
    try {
      return JSON.parse(readFileSync(this.planFile(r), "utf8")) as Plan;
    } catch {
      return undefined;
    }
  }

  private writePlan(r: { id: string }, p: Plan): void {
    const f = this.planFile(r);
    writeFileSync(`${f}.new`, JSON.stringify(p), { mode: 0o600 });
    renameSync(`${f}.new`, f);
  }

  /** Ids of VMs that left this daemon (their disks in its pools are the destination's now). */
  departed(): Set<string> {
    try {
      return new Set(readFileSync(join(this.h.home, "migrated-away"), "utf8").split("\n").filter((l) => /^[0-9a-f]{12}$/.test(l)));
    } catch {
      return new Set();
    }
  }

  get(name: string): MigrationStatus {
    const s = this.status.get(name);
    if (s === undefined) throw new TypevisorError("NOT_FOUND", `no migration of VM ${name} is known to this daemon`);
    return s;
  }

  // ---- source -----------------------------------------------------------------------------------

  async start(name: string, input: z.output<typeof migrateSpec>): Promise<MigrationStatus> {
    const url = new URL(input.to);
    if (url.protocol !== "https:" || url.hostname === "") throw new TypevisorError("INVALID_REQUEST", `the destination must be a daemon's https:// URL (got ${input.to})`);
    return this.h.serial(name, async () => {
      const r = this.h.row(name);
      if (r.state !== "running" && r.state !== "paused") throw new TypevisorError("VM_STATE", `cannot migrate VM ${name}: it is ${r.state} (migrate needs running or paused)`);
      if (!input.copyDisks) {
        const local = r.disks.filter((d) => !this.shared(d));
        if (local.length > 0) {
          throw new TypevisorError("MIGRATION_UNSUPPORTED", `VM ${name}'s disk ${local[0]!.path} is in this daemon's own directory, which the destination cannot open`, { hint: "copy it with --copy-disks, or put the disks in a pool on storage both daemons see" });
        }
      }
      const plan: Plan = { role: "source", id: randomBytes(12).toString("hex"), peer: { url: url.origin, token: input.peerToken, ...(input.peerFingerprint !== undefined ? { fingerprint: input.peerFingerprint } : {}) }, ...(input.maxDowntimeMs !== undefined ? { maxDowntimeMs: input.maxDowntimeMs } : {}), ...(input.copyDisks ? { copyDisks: true } : {}), startedAt: new Date().toISOString() };
      // The plan before the state: a daemon killed between the two finds a plan of a VM that is not migrating, and drops it.
      this.writePlan(r, plan);
      this.h.setState(name, "migrating");
      this.h.event("vm.migrating", name, `VM ${name} migrating to ${url.origin}`, { to: url.origin, migration: plan.id });
      const st: MigrationStatus = { vm: name, to: url.origin, phase: "preparing", startedAt: plan.startedAt };
      this.status.set(name, st);
      crashPoint("migrate-source-marked");
      void this.drive(name, r, plan, r.state).catch((e: unknown) => this.h.log.error({ vm: name, err: (e as Error).message }, "migration driver failed"));
      return st;
    });
  }

  private shared(d: DiskRow): boolean {
    return (d.pool ?? "default") !== "default" || !d.path.startsWith(homePaths(this.h.home).vms + sep);
  }

  private peer(plan: Plan): PeerApi {
    const u = new URL(plan.peer!.url);
    if (this.h.peer === undefined) throw new TypevisorError("MIGRATION_UNSUPPORTED", "this daemon was not given a way to reach other daemons");
    return this.h.peer({ host: u.hostname.replace(/^\[|\]$/g, ""), port: Number(u.port === "" ? 443 : u.port), token: plan.peer!.token, ...(plan.peer!.fingerprint !== undefined ? { fingerprint: plan.peer!.fingerprint } : {}) });
  }

  private async drive(name: string, r: VmRow, plan: Plan, before: VmState): Promise<void> {
    const st = this.status.get(name)!;
    const vmm = new VmmClient(vmPaths(this.h.home, r.id).apiSocket);
    let prepared = false;
    let mine: Awaited<ReturnType<typeof oneTimeCertificate>>;
    let ans: z.infer<typeof incomingAnswer>;
    try {
      mine = await oneTimeCertificate(`typevisor migration source ${plan.id}`);
      ans = await this.peer(plan).prepareIncoming({
        migrationId: plan.id, vmId: r.id, spec: r.spec,
        disks: r.disks.map((d) => ({ path: d.path, format: d.format ?? "raw", sizeBytes: d.sizeBytes, ...(d.backing !== undefined ? { backing: d.backing } : {}), ...(d.chain !== undefined ? { chain: d.chain } : {}) })),
        sourceFingerprint: mine.fingerprint,
        ...(plan.copyDisks === true ? { copyDisks: true } : {}),
      });
      prepared = true;
      crashPoint("migrate-source-peer-prepared");
      st.phase = "connecting";
    } catch (e) {
      if (prepared) await this.abortPeer(plan);
      await this.revert(name, r.id, before, (e as Error).message);
      return;
    }
    try {
      const tls = { cert: mine.cert, key: mine.key, peerFingerprint: ans.fingerprint };
      let target: { to: string; tls?: typeof tls } = { to: ans.endpoint, tls };
      if (this.h.sandboxed) {
        // A jailed VMM cannot reach the network: it sends to a socket in its out/ directory, and this daemon carries it (migration-relay.ts).
        const uid = this.h.store.getVm(name)?.runtime?.sandboxUid;
        if (uid === undefined) throw new TypevisorError("MIGRATION_UNSUPPORTED", `VM ${name}'s VMM runs outside the sandbox of this sandboxing daemon (started before it sandboxed?): restart it first`);
        const sock = join(vmPaths(this.h.home, r.id).outDir, "migrate.sock");
        this.relays.set(r.id, await relayOutgoing(sock, { uid, gid: uid }, ans.endpoint, tls, (e) => this.h.log.warn({ vm: name, err: e.message }, "the migration relay could not reach the destination")));
        target = { to: `unix:${sock}` };
      }
      // A VMM busy with its guest may take long to answer (its first migration loads the code): a minute.
      await vmm.call("POST", "/migrate", { ...target, ...(plan.maxDowntimeMs !== undefined ? { maxDowntimeMs: plan.maxDowntimeMs } : {}), ...(plan.copyDisks === true ? { disks: "copy" } : {}) }, 60_000);
      crashPoint("migrate-source-vmm-started");
    } catch (e) {
      const code = (e as { code?: string }).code;
      // Refused: nothing started. No answer: it may have started after all, so it is not assumed
      // failed; watch() asks the VMM (no migration there: B's VMM is dropped first, then ours runs on).
      if (code !== "VMM_TIMEOUT" && code !== "VMM_UNREACHABLE") {
        this.endRelay(r.id);
        await this.abortPeer(plan);
        await this.revert(name, r.id, before, (e as Error).message);
        return;
      }
      this.h.log.warn({ vm: name, err: (e as Error).message }, "the VMM did not answer the migration request; asking it how it stands");
    }
    await this.watch(name, r.id, plan);
  }

  /** Poll the source VMM until its migration ends; a completed one ends the VMM, whose exit (vmmEnded) confirms with B. */
  private async watch(name: string, id: string, plan: Plan): Promise<void> {
    const st = this.status.get(name)!;
    const vmm = new VmmClient(vmPaths(this.h.home, id).apiSocket);
    for (;;) {
      await sleep(200);
      const r = this.h.store.getVm(name);
      if (r?.id !== id || r.state !== "migrating") return;
      const proc = this.h.vmm(id);
      if (proc === undefined || !proc.alive) return; // its exit is vmmEnded's
      let p: { phase?: string; error?: string };
      try {
        p = await vmm.call<{ phase?: string; error?: string }>("GET", "/migrate", undefined, 5000);
      } catch (e) {
        if ((e as { code?: string }).code === "NOT_FOUND") {
          // Killed before the VMM was asked: nothing left here; B's prepared VMM goes.
          await this.abortPeer(plan);
          await this.revert(name, id, undefined, "the migration never started (the daemon restarted before asking its VMM)");
          return;
        }
        continue; // busy, or exiting
      }
      st.vmm = p as Record<string, unknown>;
      if (p.phase !== undefined && ["connecting", "precopy", "stopped", "committed"].includes(p.phase)) st.phase = p.phase as MigrationStatus["phase"];
      if (p.phase === "completed") {
        st.phase = "confirming";
        return;
      }
      if (p.phase === "failed" || p.phase === "cancelled") {
        if (/did not confirm it runs/.test(p.error ?? "")) {
          st.phase = "confirming";
          await this.settleUnknown(name, id, plan);
          return;
        }
        await this.abortPeer(plan);
        await this.revert(name, id, undefined, p.error ?? p.phase, p.phase === "cancelled");
        return;
      }
    }
  }

  /** B took the guest but its RUNNING never came: ask B until it says, then end one of the two copies (the paused one here, or B's dead one). */
  private async settleUnknown(name: string, id: string, plan: Plan): Promise<void> {
    for (let delay = 500; ; delay = Math.min(delay * 2, 10_000)) {
      const s = await this.peer(plan).incomingStatus(plan.id).catch(() => undefined);
      if (s?.state === "running") {
        const proc = this.h.vmm(id);
        const pid = this.h.store.getVm(name)?.runtime?.pid;
        if (pid !== undefined) this.h.kill(pid);
        await proc?.died;
        return; // vmmEnded drops the row
      }
      if (s?.state === "absent") {
        await new VmmClient(vmPaths(this.h.home, id).apiSocket).resume().catch(() => undefined);
        await this.revert(name, id, "running", "the destination did not run the VM; it runs on here");
        return;
      }
      await sleep(delay);
    }
  }

  private async abortPeer(plan: Plan): Promise<void> {
    try {
      await this.peer(plan).abortIncoming(plan.id);
    } catch (e) {
      // B drops an incoming row whose VMM ends anyway (the stream is cut): this is only to be quick.
      this.h.log.warn({ migration: plan.id, err: (e as Error).message }, "could not tell the destination to drop its incoming VM");
    }
  }

  /** The migration did not happen: the VM is A's as before (its state from the VMM's own when not known). */
  private async revert(name: string, id: string, to: VmState | undefined, why: string, cancelled = false): Promise<void> {
    await this.h.serial(name, async () => {
      const r = this.h.store.getVm(name);
      if (r?.id !== id || r.state !== "migrating") return;
      let state = to;
      if (state === undefined) {
        const vs = await new VmmClient(vmPaths(this.h.home, id).apiSocket).info().then((i) => i.state, () => undefined);
        state = vs === "paused" ? "paused" : "running";
      }
      this.h.setState(name, state);
      rmSync(this.planFile(r), { force: true });
      this.endRelay(id);
      const st = this.status.get(name);
      if (st !== undefined) Object.assign(st, { phase: cancelled ? "cancelled" : "failed", error: why, endedAt: new Date().toISOString() });
      this.h.event("vm.migration-failed", name, `VM ${name} did not migrate (${why}); it runs on here`, { error: why });
    });
  }

  async cancel(name: string): Promise<MigrationStatus> {
    const r = this.h.row(name);
    if (r.state !== "migrating") throw new TypevisorError("VM_STATE", `VM ${name} is not migrating`);
    await new VmmClient(vmPaths(this.h.home, r.id).apiSocket).call("DELETE", "/migrate");
    return this.get(name);
  }

  // ---- destination ------------------------------------------------------------------------------

  async prepareIncoming(input: z.output<typeof incomingSpec>, localAddress: string | undefined): Promise<z.infer<typeof incomingAnswer>> {
    if (localAddress === undefined || isIP(localAddress.replace(/^::ffff:/, "")) === 0) throw new TypevisorError("INVALID_REQUEST", "a migration is prepared over the daemon's HTTPS listener (the stream comes to the address the source reached)");
    const host = localAddress.replace(/^::ffff:/, "");
    const name = input.spec.name;
    const copy = input.copyDisks === true;
    // Every file the VM will open must be on storage this daemon was told it may give VMs (--allow-files); copied disks are this daemon's own files.
    if (!copy) for (const d of input.disks) for (const f of [d.path, ...(d.chain ?? (d.backing !== undefined ? [d.backing] : []))]) this.allowed(f);
    if (this.h.store.getVm(name) !== undefined) throw new TypevisorError("VM_EXISTS", `a VM named ${name} already exists here`);
    const boot = this.bootFiles(input.spec);
    const id = randomBytes(6).toString("hex");
    const p = vmPaths(this.h.home, id);
    // Copied: the incoming VMM makes each file (disk-targets.ts) in the VM's directory, under the
    // disk's own name (disk<N>), in the disk's format: a qcow2 disk's copy is a standalone image
    // (what the source's whole chain holds; no backing file here).
    const disks: DiskRow[] = copy
      ? input.disks.map((d, i) => ({ path: join(p.dir, `disk${/disk(\d+)\.[a-z0-9]+$/.exec(d.path)?.[1] ?? i}.${d.format}`), sizeBytes: d.sizeBytes, format: d.format }))
      : input.disks.map((d) => ({ path: d.path, sizeBytes: d.sizeBytes, format: d.format, ...(d.backing !== undefined ? { backing: d.backing } : {}), ...(d.chain !== undefined ? { chain: d.chain } : {}) }));
    if (new Set(disks.map((d) => d.path)).size !== disks.length) throw new TypevisorError("INVALID_REQUEST", "two disks of the incoming VM have the same name");
    mkdirSync(p.outDir, { recursive: true, mode: 0o700 });
    // The VM's own kernel, initrd and command line, as a create makes them: what a later start here boots.
    await copyFile(boot.kernel, join(p.dir, "vmlinuz"));
    if (boot.initrd !== undefined) await copyFile(boot.initrd, join(p.dir, "initrd.img"));
    if (boot.cmdline !== undefined) writeFileSync(join(p.dir, "cmdline"), boot.cmdline);
    const now = new Date().toISOString();
    // Copied disks are in this daemon's default pool, whatever pool they were in at the source.
    const spec = copy ? { ...input.spec, pool: "default" } : input.spec;
    this.h.store.insertVm({ id, name, spec, state: "incoming", createdAt: now, updatedAt: now, dir: p.dir, disks, restarts: 0 });
    this.writePlan({ id }, { role: "destination", id: input.migrationId, startedAt: now });
    this.h.event("vm.incoming", name, `VM ${name} is being migrated here (migration ${input.migrationId})`, { migration: input.migrationId });
    crashPoint("migrate-dest-row");
    try {
      const mine = await oneTimeCertificate(`typevisor migration destination ${input.migrationId}`);
      const certFile = join(p.dir, "tls-cert.pem");
      const keyFile = join(p.dir, "tls-key.pem");
      const port = await freePort(host);
      const endpoint = `tcp:${host.includes(":") ? `[${host}]` : host}:${port}`;
      // A jailed VMM listens on a unix socket in its out/ directory and this daemon carries the stream to it (migration-relay.ts); else it listens itself.
      const vmmSocket = join(p.outDir, "incoming.sock");
      let vmm: { alive: () => boolean };
      if (this.h.sandboxed) {
        // Copied disks: made here, which the jail binds (the VMM cannot create files in the VM's
        // directory): empty raw files, blank qcow2 images of the disk's size (what the jail reads
        // of a qcow2 disk's chain must be there already; the VMM accepts a blank one: disk-targets.ts).
        if (copy) {
          for (const d of disks) {
            if (d.format === "qcow2") createQcow2(d.path, { size: d.sizeBytes });
            else writeFileSync(d.path, "", { mode: 0o600, flag: "wx" });
          }
        }
        vmm = await this.h.startIncoming(name, { endpoint: `unix:${vmmSocket}` });
      } else {
        writeFileSync(certFile, mine.cert, { mode: 0o600 });
        writeFileSync(keyFile, mine.key, { mode: 0o600 });
        vmm = await this.h.startIncoming(name, { endpoint, tls: { certFile, keyFile, peerFingerprint: input.sourceFingerprint } });
      }
      // Listening once it says so (the VMM read its credentials before: they go now).
      const deadline = Date.now() + this.h.startTimeoutMs;
      while (!readLog(p.vmmLog).includes("waiting for a migration")) {
        if (!vmm.alive() || Date.now() > deadline) throw new TypevisorError("VMM_SPAWN", `the incoming VMM did not start listening: ${readLog(p.vmmLog).slice(-500)}`);
        await sleep(50);
      }
      rmSync(certFile, { force: true });
      rmSync(keyFile, { force: true });
      if (this.h.sandboxed) {
        this.relays.set(id, await relayIncoming(endpoint, { cert: mine.cert, key: mine.key, peerFingerprint: input.sourceFingerprint }, vmmSocket, (line) => this.h.log.info({ vm: name }, line)));
      }
      crashPoint("migrate-dest-listening");
      void this.awaitArrival(name, id, vmm.alive);
      return { endpoint, fingerprint: mine.fingerprint };
    } catch (e) {
      await this.dropIncoming(name, id, (e as Error).message);
      throw e;
    }
  }

  /**
   * What a later start of the VM here boots (the running guest needs none of it): the same image
   * of this daemon's, or the spec's kernel and initrd if this daemon may read them (--allow-files).
   * Without them the VM could run here but never start again: refused.
   */
  private bootFiles(spec: z.output<typeof vmSpec>): { kernel: string; initrd?: string; cmdline?: string } {
    if (spec.kernel !== undefined) {
      this.allowed(spec.kernel);
      if (spec.initrd !== undefined) this.allowed(spec.initrd);
      return { kernel: spec.kernel, ...(spec.initrd !== undefined ? { initrd: spec.initrd } : {}) };
    }
    const ip = imagePaths(spec.image!, this.h.imagesHome);
    if (!existsSync(ip.kernel)) throw new TypevisorError("IMAGE_NOT_FOUND", `the destination has no image named ${spec.image!}, which the VM boots from when it is started again`, { hint: `build it there first: typevisor image build ${spec.image!}` });
    const cmdline = existsSync(ip.manifest) ? parseManifest(readFileSync(ip.manifest, "utf8"), ip.manifest).cmdline : undefined;
    return { kernel: ip.kernel, ...(existsSync(ip.initrd) ? { initrd: ip.initrd } : {}), ...(cmdline !== undefined ? { cmdline } : {}) };
  }

  private allowed(f: string): void {
    let real: string;
    try {
      real = realpathSync(f);
    } catch {
      real = "";
    }
    if (real === "" || !this.h.allowedDirs.some((d) => real.startsWith(d.endsWith(sep) ? d : d + sep))) {
      throw new TypevisorError("PATH_NOT_ALLOWED", `${f} is not on storage this daemon may give a VM`, { hint: "the disks must be on storage both daemons see, under one of the destination daemon's --allow-files directories" });
    }
  }

  /** The incoming VMM's API socket comes up only once the VM runs there (cli/run.ts): then the row is running. */
  private async awaitArrival(name: string, id: string, alive: () => boolean): Promise<void> {
    try {
      await new VmmClient(vmPaths(this.h.home, id).apiSocket).waitReady(Date.now() + 24 * 3600_000, alive);
    } catch {
      return; // its exit drops the row (vmmEnded)
    }
    await this.arrived(name, id);
  }

  private async arrived(name: string, id: string): Promise<void> {
    await this.h.serial(name, async () => {
      const r = this.h.store.getVm(name);
      if (r?.id !== id || r.state !== "incoming") return;
      crashPoint("migrate-dest-before-running");
      // The relay (a sandboxed VMM's) carries the last frames (RUNNING) and ends with the stream: not closed here.
      this.relays.delete(id);
      const plan = this.readPlan(r);
      if (plan !== undefined) this.writePlan(r, { ...plan, arrived: true });
      this.h.setState(name, "running");
      this.h.event("vm.migrated-in", name, `VM ${name} arrived and runs here (migration ${plan?.id ?? "?"})`, { migration: plan?.id });
    });
  }

  /** B's row of a migration that did not arrive: gone, with its directory (the disks are on shared storage, not in it). */
  private async dropIncoming(name: string, id: string, why: string): Promise<void> {
    const r = this.h.store.getVm(name);
    if (r?.id !== id) return;
    const proc = this.h.vmm(id);
    if (proc?.alive === true && r.runtime !== undefined) {
      this.h.kill(r.runtime.pid);
      await proc.died;
    }
    const cur = this.h.store.getVm(name);
    if (cur?.id !== id || cur.state !== "incoming") return;
    this.endRelay(id);
    this.h.store.deleteVm(name);
    rmSync(vmPaths(this.h.home, id).dir, { recursive: true, force: true });
    this.h.event("vm.migration-failed", name, `the incoming migration of VM ${name} did not arrive (${why}); nothing of it is left here`, { error: why });
  }

  private findByMigration(migrationId: string): VmRow | undefined {
    return this.h.store.listVms().find((r) => this.readPlan(r)?.id === migrationId);
  }

  /**
   * Where an incoming migration is. The row alone can lag: the VMM runs the guest (its API socket
   * is up) a moment before awaitArrival's poll sees it, and a source that heard RUNNING asks in
   * that moment. So an `incoming` row whose VMM answers is marked arrived first.
   */
  async incomingStatus(migrationId: string): Promise<z.infer<typeof incomingState>> {
    let r = this.findByMigration(migrationId);
    if (r === undefined) return { migrationId, state: "absent" };
    if (r.state === "incoming" && (await this.vmmAnswers(r.id))) {
      await this.arrived(r.name, r.id);
      r = this.findByMigration(migrationId);
      if (r === undefined) return { migrationId, state: "absent" };
    }
    return { migrationId, state: r.state === "incoming" ? "waiting" : "running", vm: r.name };
  }

  /** Drop an incoming migration that has not arrived; one whose VMM runs the guest is never dropped (VM_STATE). */
  async abortIncoming(migrationId: string): Promise<z.infer<typeof incomingState>> {
    const s = await this.incomingStatus(migrationId);
    if (s.state === "absent") return s;
    if (s.state === "running") throw new TypevisorError("VM_STATE", `VM ${s.vm ?? "?"} has arrived and runs here: the migration cannot be undone`);
    const r = this.findByMigration(migrationId);
    if (r === undefined) return { migrationId, state: "absent" };
    await this.dropIncoming(r.name, r.id, "the source gave up");
    return this.incomingStatus(migrationId);
  }

  /** The incoming VMM's API socket answers only once the guest runs there (cli/run.ts). */
  private vmmAnswers(id: string): Promise<boolean> {
    return new VmmClient(vmPaths(this.h.home, id).apiSocket, 2000).info().then(() => true, () => false);
  }

  // ---- both: a VMM's end, a daemon's start ------------------------------------------------------

  /** recordEnd for a row in migrating or incoming (in the VM's queue). */
  vmmEnded(r: VmRow, result: string | undefined): void {
    if (r.state === "incoming") {
      // Dropped here (not through dropIncoming: we are in the queue already, and the VMM is dead).
      this.endRelay(r.id);
      this.h.store.deleteVm(r.name);
      rmSync(r.dir, { recursive: true, force: true });
      this.h.event("vm.migration-failed", r.name, `the incoming migration of VM ${r.name} did not arrive (its VMM ended: ${result ?? "killed"}); nothing of it is left here`, { result });
      return;
    }
    this.endRelay(r.id);
    const plan = this.readPlan(r);
    if (plan === undefined) return;
    const st = this.status.get(r.name) ?? { vm: r.name, to: plan.peer?.url ?? "?", phase: "confirming" as const, startedAt: plan.startedAt };
    st.phase = "confirming";
    this.status.set(r.name, st);
    void this.confirm(r.name, r.id, plan, result === "migrated");
  }

  /** The source VMM is gone: ask B whose the VM is, and make this inventory agree. */
  private async confirm(name: string, id: string, plan: Plan, handedOver: boolean): Promise<void> {
    for (let delay = 500; ; delay = Math.min(delay * 2, 10_000)) {
      const s = await this.peer(plan).incomingStatus(plan.id).catch((e: unknown) => {
        this.h.log.warn({ vm: name, err: (e as Error).message }, "the destination does not answer; the VM stays migrating here until it does");
        return undefined;
      });
      // Waiting, after our VMM heard B's RUNNING: B's row lags its VMM; ask again (aborting would end the only guest).
      if (s?.state === "waiting" && !handedOver) await this.abortPeer(plan);
      else if (s !== undefined && s.state !== "waiting") {
        await this.h.serial(name, async () => {
          const r = this.h.store.getVm(name);
          if (r?.id !== id || r.state !== "migrating") return;
          const st = this.status.get(name);
          if (s.state === "running" || handedOver) {
            appendFileSync(join(this.h.home, "migrated-away"), `${id}\n`, { mode: 0o600 });
            this.h.store.deleteVm(name);
            rmSync(r.dir, { recursive: true, force: true });
            if (st !== undefined) Object.assign(st, { phase: "completed", endedAt: new Date().toISOString() });
            this.h.event("vm.migrated", name, `VM ${name} migrated to ${plan.peer?.url ?? "?"}: it runs there now and is no longer in this inventory`, { to: plan.peer?.url, migration: plan.id });
          } else {
            // B never ran it and our VMM ended without handing it over: the guest ended here.
            this.h.setState(name, "crashed");
            rmSync(this.planFile(r), { force: true });
            if (st !== undefined) Object.assign(st, { phase: "failed", error: "the VMM ended before the switch-over", endedAt: new Date().toISOString() });
            this.h.event("vm.crashed", name, `VM ${name}'s VMM ended during its migration, before the switch-over; it did not move`, {});
          }
        });
        return;
      }
      await sleep(delay);
    }
  }

  /** After the daemon's start (VMMs re-attached): pick up every migration a previous daemon left. */
  async recover(): Promise<void> {
    for (const r of this.h.store.listVms()) {
      const plan = this.readPlan(r);
      if (plan === undefined) continue;
      if (plan.role === "source" && r.state !== "migrating") {
        rmSync(this.planFile(r), { force: true }); // killed between the plan and the state
        continue;
      }
      if (r.state === "migrating") {
        this.status.set(r.name, { vm: r.name, to: plan.peer?.url ?? "?", phase: "confirming", startedAt: plan.startedAt });
        const proc = this.h.vmm(r.id);
        if (proc?.alive === true) void this.watch(r.name, r.id, plan);
        else if (r.runtime === undefined) void this.confirm(r.name, r.id, plan, r.lastExit?.result === "migrated");
        // (a dead VMM with a runtime recorded: its exit is being recorded, which calls vmmEnded)
      } else if (r.state === "incoming") {
        if (await this.vmmAnswers(r.id)) await this.arrived(r.name, r.id);
        else void this.h.serial(r.name, () => this.dropIncoming(r.name, r.id, "the daemon restarted before the VM arrived"));
      }
    }
  }
}

function readLog(f: string): string {
  try {
    return readFileSync(f, "utf8").slice(-64 * 1024);
  } catch {
    return "";
  }
}

/** A TCP port free on `host` now (the VMM binds it a moment later; a race only with another local binder). */
function freePort(host: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, host, () => {
      const a = s.address();
      s.close(() => (typeof a === "object" && a !== null ? resolve(a.port) : reject(new Error("no port"))));
    });
  });
}
