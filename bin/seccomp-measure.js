#!/usr/bin/env node
/**
 * How the VMM's seccomp allowlist (src/sys/seccomp.ts) is measured (docs/security.md, "seccomp"):
 * run VMMs under `strace -f -qq -o LOG ...` (any test or command that starts them: the VMMs are
 * found in the log by their execve of `typevisor.js run`), then
 *
 *   node bin/seccomp-measure.js LOG [LOG...]
 *
 * prints every system call the VMM processes made after that execve (their threads included, found
 * through clone's results), with counts, the ones the kernel refused, and for the calls whose
 * arguments the filter checks (ioctl, socket, clone, prctl, ...) which argument values were seen;
 * then the same for the vCPU threads alone (the threads that ran KVM_RUN), counted from their
 * first KVM_RUN on. `--json` prints it as one object. Calls outside the current allowlist are
 * marked `NOT ALLOWED`.
 */
import { readFileSync } from "node:fs";
import { URL } from "node:url";

const args = process.argv.slice(2);
const json = args.includes("--json");
const files = args.filter((a) => a !== "--json");
if (files.length === 0) {
  process.stderr.write("usage: node bin/seccomp-measure.js STRACE_LOG... [--json]\n");
  process.exit(2);
}

/** Calls whose argument N is worth listing (the filter checks these, or they are the interesting ones). */
const ARG_OF = { ioctl: 1, socket: 0, socketpair: 0, clone: 0, prctl: 0, fcntl: 1, madvise: 2, futex: 1, setsockopt: 1, getsockopt: 1, mmap: 2, mprotect: 2, kill: 1, mremap: 3 };

function splitArgs(s) {
  // Top-level commas of "a, b, {c, d}, [e]" (strace's own quoting: strings are "..." with escapes).
  const out = [];
  let depth = 0;
  let cur = "";
  let inStr = false;
  for (let i = 0; i < s.length; i++) {
    const c = s[i];
    if (inStr) {
      cur += c;
      if (c === "\\") cur += s[++i] ?? "";
      else if (c === '"') inStr = false;
      continue;
    }
    if (c === '"') inStr = true;
    if (c === "(" || c === "{" || c === "[") depth++;
    if (c === ")" || c === "}" || c === "]") depth--;
    if (c === "," && depth === 0) {
      out.push(cur.trim());
      cur = "";
    } else cur += c;
  }
  if (cur.trim() !== "") out.push(cur.trim());
  return out;
}

const vmm = new Set(); // tids of VMM processes and their threads
const vcpuFrom = new Set(); // tids that ran KVM_RUN
const all = new Map(); // name -> {n, refused: Map errno->n, args: Map value->n}
const vcpu = new Map();
const pending = new Map(); // tid -> name of an unfinished call
const execs = new Map(); // tid -> whether its unfinished execve runs the VMM

function count(map, name, arg, ret) {
  let e = map.get(name);
  if (e === undefined) map.set(name, (e = { n: 0, refused: new Map(), args: new Map() }));
  e.n++;
  if (arg !== undefined) {
    e.args.set(arg, (e.args.get(arg) ?? 0) + 1);
  }
  const m = / = -1 (E[A-Z]+)/.exec(ret ?? "");
  if (m !== null) e.refused.set(m[1], (e.refused.get(m[1]) ?? 0) + 1);
}

for (const f of files) {
  for (const line of readFileSync(f, "utf8").split("\n")) {
    const m = /^(\d+)\s+(.*)$/.exec(line);
    if (m === null) continue;
    const tid = Number(m[1]);
    let body = m[2];
    if (body.startsWith("execve(")) {
      // An execve often shows as "<unfinished ...>" then "<... execve resumed>) = 0".
      // Not `run --sandbox`'s own process: root, unconfined, the supervisor of the jailed VMM (whose own execve has no --sandbox).
      const run = /typevisor\.js", "run"/.test(body) && !/"--sandbox"/.test(body);
      if (body.endsWith("<unfinished ...>")) execs.set(tid, run);
      else if (/ = 0$/.test(body)) {
        if (run) vmm.add(tid);
        else vmm.delete(tid); // it became something else
      }
      continue;
    }
    if (body.startsWith("<... execve resumed>")) {
      const run = execs.get(tid);
      execs.delete(tid);
      if (/ = 0$/.test(body)) {
        if (run === true) vmm.add(tid);
        else vmm.delete(tid);
      }
      continue;
    }
    if (!vmm.has(tid)) continue;
    let name;
    let argText = "";
    let ret = "";
    const resumed = /^<\.\.\. ([a-z0-9_]+) resumed>(.*)$/.exec(body);
    if (resumed !== null) {
      // The call was counted when it started; its result is here.
      name = resumed[1];
      ret = resumed[2];
      const was = pending.get(tid);
      pending.delete(tid);
      if (was !== undefined && / = -1 E/.test(ret)) {
        const map = vcpuFrom.has(tid) ? [all, vcpu] : [all];
        for (const mp of map) {
          const e = mp.get(name);
          const r = / = -1 (E[A-Z]+)/.exec(ret);
          if (e !== undefined && r !== null) e.refused.set(r[1], (e.refused.get(r[1]) ?? 0) + 1);
        }
      }
      if ((name === "clone" || name === "clone3") && /= (\d+)/.test(ret)) vmm.add(Number(/= (\d+)/.exec(ret)[1]));
      continue;
    }
    const call = /^([a-z0-9_]+)\((.*)$/.exec(body);
    if (call === null) continue;
    name = call[1];
    const unfinished = body.endsWith("<unfinished ...>");
    if (unfinished) {
      argText = call[2].replace(/\s*<unfinished \.\.\.>$/, "");
      pending.set(tid, name);
    } else {
      const i = call[2].lastIndexOf(") = ");
      argText = i >= 0 ? call[2].slice(0, i) : call[2];
      ret = i >= 0 ? call[2].slice(i + 1) : "";
    }
    const idx = ARG_OF[name];
    // strace prints clone's arguments as child_stack=..., flags=...: the flags are what matters.
    const arg = name === "clone" ? (/flags=([A-Z_|0-9x]+)/.exec(argText)?.[1] ?? argText) : idx !== undefined ? splitArgs(argText)[idx] : undefined;
    if (name === "ioctl" && arg === "KVM_RUN") vcpuFrom.add(tid);
    count(all, name, arg, ret);
    if (vcpuFrom.has(tid)) count(vcpu, name, arg, ret);
    if ((name === "clone" || name === "clone3") && /= (\d+)$/.test(ret)) vmm.add(Number(/= (\d+)$/.exec(ret)[1]));
  }
}

let allowed;
try {
  const s = await import(new URL("../dist/sys/seccomp.js", import.meta.url).href);
  allowed = { vmm: new Set(Object.keys(s.VMM_SYSCALLS)), vcpu: new Set(Object.keys(s.VCPU_SYSCALLS)) };
} catch {
  allowed = undefined; // not built: no comparison
}

const report = (map, which) => [...map.entries()].sort((a, b) => a[0].localeCompare(b[0])).map(([name, e]) => ({
  name, n: e.n,
  ...(e.refused.size > 0 ? { refused: Object.fromEntries(e.refused) } : {}),
  ...(e.args.size > 0 ? { args: Object.fromEntries([...e.args.entries()].sort((a, b) => b[1] - a[1])) } : {}),
  ...(allowed !== undefined && !allowed[which].has(name) ? { notAllowed: true } : {}),
}));
const out = { vmmThreads: vmm.size, vcpuThreads: vcpuFrom.size, vmm: report(all, "vmm"), vcpu: report(vcpu, "vcpu") };
if (json) {
  process.stdout.write(JSON.stringify(out, null, 1) + "\n");
} else {
  for (const [title, rows] of [[`VMM processes (${out.vmmThreads} threads)`, out.vmm], [`vCPU threads (${out.vcpuThreads}), from their first KVM_RUN`, out.vcpu]]) {
    process.stdout.write(`${title}: ${rows.length} system calls\n`);
    for (const r of rows) {
      const args = r.args !== undefined ? `  [${Object.entries(r.args).slice(0, 12).map(([k, v]) => `${k}:${v}`).join(" ")}]` : "";
      const refused = r.refused !== undefined ? `  refused ${JSON.stringify(r.refused)}` : "";
      process.stdout.write(`  ${r.name.padEnd(20)} ${String(r.n).padStart(8)}${r.notAllowed === true ? "  NOT ALLOWED" : ""}${refused}${args}\n`);
    }
  }
}
