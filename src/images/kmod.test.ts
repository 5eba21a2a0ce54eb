import { spawnSync } from "node:child_process";
import { readFile } from "node:fs/promises";
import { beforeAll, describe, expect, it } from "vitest";
import { fetchPackage, kernelRelease, KERNEL_PACKAGE, type DebianPackage } from "./debian.js";
import { indexModules, moduleName, readModinfo, resolveLoadOrder, softdepPre, type ModuleIndex } from "./kmod.js";

// Real modules from Debian's cloud kernel package (downloaded once into the cache, reused).
const hasApt = spawnSync("apt-get", ["--version"]).status === 0 && spawnSync("dpkg-deb", ["--version"]).status === 0;

describe.skipIf(!hasApt)("modules of Debian's linux-image-cloud-amd64", () => {
  let pkg: DebianPackage;
  let index: ModuleIndex;

  beforeAll(async () => {
    pkg = await fetchPackage("linux-image-cloud-amd64", { concrete: KERNEL_PACKAGE });
    index = await indexModules(pkg.root, await kernelRelease(pkg));
  }, 300_000);

  it("reads name and depends from .modinfo the way the package's own modules declare them", async () => {
    const path = index.files.get("virtio_net");
    expect(path).toBeDefined();
    const info = readModinfo(await readFile(path as string));
    expect(info.get("name")).toEqual(["virtio_net"]);
    expect(info.get("vermagic")?.[0]?.startsWith(index.release)).toBe(true);
    const deps = (info.get("depends")?.[0] ?? "").split(",");
    expect(deps).toContain("net_failover");
  });

  it("orders dependencies before dependents and skips built-ins", async () => {
    const order = await resolveLoadOrder(index, ["virtio_net", "vmw_vsock_virtio_transport", "ext4?"]);
    const names = order.map((m) => m.name);
    expect(new Set(names).size).toBe(names.length);
    for (const m of order) {
      const deps = (readModinfo(await readFile(m.path)).get("depends")?.[0] ?? "").split(",").filter((d) => d !== "");
      for (const d of deps) {
        if (index.builtin.has(moduleName(d))) continue;
        expect(names.indexOf(moduleName(d)), `${d} before ${m.name}`).toBeLessThan(names.indexOf(m.name));
      }
    }
    expect(names).toContain("failover");
    // ext4 is built into the cloud kernel (modules.builtin), so it is not loaded
    expect(index.builtin.has("ext4")).toBe(true);
    expect(names).not.toContain("ext4");
  });

  it("fails clearly on a missing module and skips a missing optional one", async () => {
    await expect(resolveLoadOrder(index, ["no_such_module"])).rejects.toThrow(/has no module no_such_module/);
    await expect(resolveLoadOrder(index, ["no_such_module?"])).resolves.toEqual([]);
  });
});

describe("readModinfo", () => {
  it("rejects non-ELF and 32-bit input", () => {
    expect(() => readModinfo(Buffer.alloc(64))).toThrow(/not an ELF/);
    const elf32 = Buffer.alloc(64);
    elf32.writeUInt32BE(0x7f454c46, 0);
    elf32[4] = 1;
    elf32[5] = 1;
    expect(() => readModinfo(elf32)).toThrow(/64-bit/);
  });
});

describe("module names", () => {
  it("treats - and _ alike and strips .ko suffixes", () => {
    expect(moduleName("kernel/arch/x86/kvm/kvm-amd.ko")).toBe("kvm_amd");
    expect(moduleName("virtio-rng.ko.xz")).toBe("virtio_rng");
  });

  it("takes the pre: part of softdep lines", () => {
    expect(softdepPre(["pre: crc32c post: foo", "post: bar pre: a b"])).toEqual(["crc32c", "a", "b"]);
  });
});
