/**
 * Kernel modules of an unpacked Debian linux-image package, without kmod tools.
 * Debian ships no modules.dep in the package (depmod runs in postinst), so dependencies are read
 * from each module's `.modinfo` ELF section (`depends=a,b` and `softdep=pre: x`), as depmod does.
 * modules.builtin (shipped) tells which names are compiled in and need no loading.
 * ELF64 layout: System V gABI "Sections" (e_shoff 0x28, e_shentsize 0x3a, e_shnum 0x3c,
 * e_shstrndx 0x3e; section header: sh_name 0x00, sh_offset 0x18, sh_size 0x20).
 */
import { existsSync } from "node:fs";
import { readdir, readFile } from "node:fs/promises";
import { basename, join, relative } from "node:path";
import { TypevisorError } from "../errors.js";

/** Module names treat '-' and '_' alike (kvm-amd.ko is module kvm_amd). */
export function moduleName(nameOrFile: string): string {
  return basename(nameOrFile).replace(/\.ko(\.(xz|zst|gz))?$/, "").replaceAll("-", "_");
}

/** The `.modinfo` key=value strings of an ELF64 little-endian relocatable (.ko) file. */
export function readModinfo(elf: Buffer): Map<string, string[]> {
  if (elf.length < 64 || elf.readUInt32BE(0) !== 0x7f454c46) throw new TypevisorError("KMOD_BAD_ELF", "not an ELF file");
  if (elf[4] !== 2 || elf[5] !== 1) throw new TypevisorError("KMOD_BAD_ELF", "not a 64-bit little-endian ELF file");
  const shoff = Number(elf.readBigUInt64LE(0x28));
  const shentsize = elf.readUInt16LE(0x3a);
  const shnum = elf.readUInt16LE(0x3c);
  const shstrndx = elf.readUInt16LE(0x3e);
  if (shentsize < 64 || shoff + shnum * shentsize > elf.length || shstrndx >= shnum) {
    throw new TypevisorError("KMOD_BAD_ELF", "ELF section header table out of bounds");
  }
  const section = (i: number): { name: number; offset: number; size: number } => {
    const h = shoff + i * shentsize;
    return { name: elf.readUInt32LE(h), offset: Number(elf.readBigUInt64LE(h + 0x18)), size: Number(elf.readBigUInt64LE(h + 0x20)) };
  };
  const strtab = section(shstrndx);
  const out = new Map<string, string[]>();
  for (let i = 0; i < shnum; i++) {
    const s = section(i);
    const nameStart = strtab.offset + s.name;
    const nameEnd = elf.indexOf(0, nameStart);
    if (nameEnd < 0 || elf.toString("latin1", nameStart, nameEnd) !== ".modinfo") continue;
    if (s.offset + s.size > elf.length) throw new TypevisorError("KMOD_BAD_ELF", ".modinfo out of bounds");
    for (const kv of elf.toString("utf8", s.offset, s.offset + s.size).split("\0")) {
      const eq = kv.indexOf("=");
      if (eq <= 0) continue;
      const k = kv.slice(0, eq);
      out.set(k, [...(out.get(k) ?? []), kv.slice(eq + 1)]);
    }
  }
  return out;
}

/** `softdep=pre: a b post: c` -> the `pre:` names. */
export function softdepPre(softdeps: string[]): string[] {
  const out: string[] = [];
  for (const s of softdeps) {
    let inPre = false;
    for (const tok of s.trim().split(/\s+/)) {
      if (tok === "pre:") inPre = true;
      else if (tok.endsWith(":")) inPre = false;
      else if (inPre && tok !== "") out.push(tok);
    }
  }
  return out;
}

export interface ModuleIndex {
  /** e.g. 6.1.0-56-cloud-amd64 */
  release: string;
  /** lib/modules/<release> */
  dir: string;
  /** module name -> absolute path of its .ko */
  files: Map<string, string>;
  builtin: Set<string>;
}

async function walk(dir: string, out: string[]): Promise<void> {
  for (const e of await readdir(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) await walk(p, out);
    else if (/\.ko(\.(xz|zst|gz))?$/.test(e.name)) out.push(p);
  }
}

/** Index `<root>/lib/modules/<release>`. */
export async function indexModules(root: string, release: string): Promise<ModuleIndex> {
  const dir = join(root, "lib", "modules", release);
  if (!existsSync(dir)) throw new TypevisorError("KMOD_NO_MODULES", `no kernel modules at ${dir}`);
  const paths: string[] = [];
  await walk(join(dir, "kernel"), paths);
  const files = new Map<string, string>();
  for (const p of paths) files.set(moduleName(p), p);
  const builtin = new Set<string>();
  const bl = join(dir, "modules.builtin");
  if (existsSync(bl)) for (const line of (await readFile(bl, "utf8")).split("\n")) if (line !== "") builtin.add(moduleName(line));
  return { release, dir, files, builtin };
}

export interface ResolvedModule {
  name: string;
  /** absolute path on the host */
  path: string;
  /** path relative to lib/modules/<release> */
  rel: string;
}

/**
 * Modules to load for `wanted`, dependencies first, each once. Built-in modules are skipped.
 * A wanted name ending in `?` is optional: skipped when the kernel has no such module.
 */
export async function resolveLoadOrder(index: ModuleIndex, wanted: string[]): Promise<ResolvedModule[]> {
  const order: ResolvedModule[] = [];
  const done = new Set<string>();
  const visiting = new Set<string>();
  const visit = async (raw: string, chain: string[]): Promise<void> => {
    const optional = raw.endsWith("?");
    const name = moduleName(optional ? raw.slice(0, -1) : raw);
    if (done.has(name) || index.builtin.has(name)) return;
    if (visiting.has(name)) throw new TypevisorError("KMOD_DEP_CYCLE", `module dependency cycle: ${[...chain, name].join(" -> ")}`);
    const path = index.files.get(name);
    if (path === undefined) {
      if (optional) return;
      throw new TypevisorError("KMOD_MISSING", `kernel ${index.release} has no module ${name}${chain.length > 0 ? ` (needed by ${chain.join(" -> ")})` : ""}`);
    }
    if (!path.endsWith(".ko")) throw new TypevisorError("KMOD_COMPRESSED", `compressed modules are not supported yet: ${path}`);
    visiting.add(name);
    const info = readModinfo(await readFile(path));
    const deps = (info.get("depends") ?? []).flatMap((d) => d.split(",")).filter((d) => d !== "");
    // soft pre-dependencies are loaded when present (modprobe does the same), never required
    const soft = softdepPre(info.get("softdep") ?? []).map((d) => `${d}?`);
    for (const d of [...deps, ...soft]) await visit(d, [...chain, name]);
    visiting.delete(name);
    done.add(name);
    order.push({ name, path, rel: relative(index.dir, path) });
  };
  for (const w of wanted) await visit(w, []);
  return order;
}
