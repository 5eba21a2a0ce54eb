/**
 * Prometheus metrics at /metrics (text exposition format 0.0.4): the host's
 * capacity, budget, allocation and use, and per-VM state, CPU, memory, disk
 * and network from the manager's latest usage sample. Gauges are filled at
 * scrape time from the manager, so nothing here holds state of its own.
 */
import { Gauge, Registry, collectDefaultMetrics } from "prom-client";
import type { AuditLog } from "../control/audit.js";
import type { VmManager } from "../control/manager.js";
import { VM_STATES } from "../control/spec.js";

export function createMetrics(manager: VmManager, audit?: AuditLog): Registry {
  const registry = new Registry();
  // The event-loop delay histogram samples with a timer of this period: prom-client's default,
  // 10 ms, woke an idle daemon 100 times a second (0.9 % of a project machine's CPU with no VM at
  // all, several times that on the KVM lab's emulated CPU). One sample a second still shows a
  // loop that stalls (docs/benchmarks.md, "An idle VMM's wake-ups").
  collectDefaultMetrics({ register: registry, prefix: "typevisor_daemon_", eventLoopMonitoringPrecision: 1000 });

  new Gauge({
    name: "typevisor_host_resource",
    help: "Host resources: CPUs or bytes, by resource (cpu, memory, disk) and kind (capacity, budget, allocated, used, free)",
    labelNames: ["resource", "kind"] as const,
    registers: [registry],
    collect() {
      const h = manager.host();
      for (const res of ["cpu", "memory", "disk"] as const) {
        for (const kind of ["capacity", "budget", "allocated", "used", "free"] as const) this.set({ resource: res, kind }, h[res][kind]);
      }
    },
  });

  const perVm = (name: string, help: string, pick: (u: NonNullable<ReturnType<VmManager["allUsage"]>[number]["usage"]>) => number): void => {
    new Gauge({
      name,
      help,
      labelNames: ["vm"] as const,
      registers: [registry],
      collect() {
        this.reset();
        for (const { vm, usage } of manager.allUsage()) if (usage !== undefined) this.set({ vm: vm.name }, pick(usage));
      },
    });
  };
  perVm("typevisor_vm_cpu_seconds", "CPU time used by the VM's VMM process (guest and VMM), seconds", (u) => u.cpuSeconds);
  perVm("typevisor_vm_cpu_percent", "CPU use over the last sample interval; 100 = one host CPU", (u) => u.cpuPercent);
  perVm("typevisor_vm_memory_bytes", "Memory charged to the VM (cgroup memory.current, else VMM resident set)", (u) => u.memoryBytes);
  perVm("typevisor_vm_disk_read_bytes", "Bytes the guest read from its virtio-blk disks", (u) => u.diskReadBytes);
  perVm("typevisor_vm_disk_write_bytes", "Bytes the guest wrote to its virtio-blk disks", (u) => u.diskWriteBytes);
  perVm("typevisor_vm_net_rx_bytes", "Bytes delivered to the guest by virtio-net", (u) => u.netRxBytes);
  perVm("typevisor_vm_net_tx_bytes", "Bytes sent by the guest through virtio-net", (u) => u.netTxBytes);

  new Gauge({
    name: "typevisor_vm_health_checks",
    help: "Health checks (GET /vm on its control socket) the daemon has asked of the VM's running VMM; every 2 s while its answers change, down to one in 8 s while they do not",
    labelNames: ["vm"] as const,
    registers: [registry],
    collect() {
      this.reset();
      for (const { vm, checks } of manager.healthChecks()) this.set({ vm }, checks);
    },
  });
  new Gauge({
    name: "typevisor_vm_state",
    help: "1 for the VM's current lifecycle state",
    labelNames: ["vm", "state"] as const,
    registers: [registry],
    collect() {
      this.reset();
      for (const vm of manager.list()) for (const s of VM_STATES) this.set({ vm: vm.name, state: s }, vm.state === s ? 1 : 0);
    },
  });
  new Gauge({
    name: "typevisor_vm_configured",
    help: "The VM's configured size: vcpus, or memory bytes",
    labelNames: ["vm", "resource"] as const,
    registers: [registry],
    collect() {
      this.reset();
      for (const vm of manager.list()) {
        const spec = vm.spec as { cpus: number; memoryMiB: number };
        this.set({ vm: vm.name, resource: "vcpus" }, spec.cpus);
        this.set({ vm: vm.name, resource: "memory_bytes" }, spec.memoryMiB * 2 ** 20);
      }
    },
  });
  new Gauge({
    name: "typevisor_pool_bytes",
    help: "Storage pools, bytes by kind: capacity (the filesystem), free (on it), quota (absent without one), allocated (virtual size of its disks), used (what their files take), available (quota or capacity minus allocated)",
    labelNames: ["pool", "kind"] as const,
    registers: [registry],
    collect() {
      this.reset();
      for (const p of manager.listPools()) {
        const kinds: [string, number | null][] = [["capacity", p.capacityBytes], ["free", p.freeBytes], ["quota", p.quotaBytes], ["allocated", p.allocatedBytes], ["used", p.usedBytes], ["available", p.availableBytes]];
        for (const [kind, v] of kinds) if (v !== null) this.set({ pool: p.name, kind }, v);
      }
    },
  });
  if (audit !== undefined) {
    new Gauge({
      name: "typevisor_audit_write_failures",
      help: "Audit log entries that could not be written since the daemon started (a full disk, an I/O error); the built-in alert audit-write fires meanwhile",
      registers: [registry],
      collect() {
        this.set(audit.failures);
      },
    });
  }
  new Gauge({
    name: "typevisor_alerts_firing",
    help: "Alerts firing now, by rule and severity",
    labelNames: ["rule", "severity"] as const,
    registers: [registry],
    collect() {
      this.reset();
      const n = new Map<string, { rule: string; severity: string; count: number }>();
      for (const a of manager.firingAlerts()) {
        const k = `${a.rule}|${a.severity}`;
        const cur = n.get(k) ?? { rule: a.rule, severity: a.severity, count: 0 };
        cur.count++;
        n.set(k, cur);
      }
      for (const { rule, severity, count } of n.values()) this.set({ rule, severity }, count);
    },
  });
  return registry;
}
