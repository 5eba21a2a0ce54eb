import { execFileSync, spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { debFilePrefix, fetchPackage, KERNEL_PACKAGE, parseCandidate, parseDepends, pidAlive, removeDeadTemps, resolveMetapackage, tempName } from "./debian.js";

const hasApt = spawnSync("apt-cache", ["--version"]).status === 0;
const aptCache = (...args: string[]): string => execFileSync("apt-cache", args, { env: { ...process.env, LC_ALL: "C" } }).toString();

describe.skipIf(!hasApt)("apt output parsing, against this host's apt", () => {
  it("resolves linux-image-cloud-amd64 to the kernel package apt-cache depends names", async () => {
    const concrete = await resolveMetapackage("linux-image-cloud-amd64", KERNEL_PACKAGE);
    expect(concrete).toMatch(/^linux-image-\d.*-cloud-amd64$/);
    expect(aptCache("depends", "linux-image-cloud-amd64")).toContain(`Depends: ${concrete}`);
    // the concrete package resolves to itself
    await expect(resolveMetapackage(concrete, KERNEL_PACKAGE)).resolves.toBe(concrete);
  });

  it("reads the candidate version from apt-cache policy", () => {
    const v = parseCandidate(aptCache("policy", "busybox-static"));
    expect(v).toBeDefined();
    expect(aptCache("show", `busybox-static=${v}`)).toContain(`Version: ${v}`);
  });
});

describe("parsers", () => {
  it("returns undefined for a package without candidate", () => {
    expect(parseCandidate("foo:\n  Installed: (none)\n  Candidate: (none)\n")).toBeUndefined();
    expect(parseCandidate("")).toBeUndefined();
  });

  it("takes Depends lines, including virtual <names> and alternatives", () => {
    expect(parseDepends("x\n  Depends: a\n |Depends: b\n  Depends: <c>\n  Recommends: d\n")).toEqual(["a", "b", "c"]);
  });

  it("names .deb files the way apt-get does (epoch colon as %3a)", () => {
    expect(debFilePrefix("busybox-static", "1:1.35.0-4")).toBe("busybox-static_1%3a1.35.0-4_");
  });
});

describe("errors", () => {
  const savedPath = process.env["PATH"];
  afterEach(() => {
    process.env["PATH"] = savedPath;
  });

  it("says to bring your own kernel when apt tools are missing", async () => {
    process.env["PATH"] = mkdtempSync(join(tmpdir(), "tv-emptypath-"));
    const err = await fetchPackage("busybox-static", { cache: join(tmpdir(), "tv-unused-cache") }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "DEBIAN_TOOLS_MISSING" });
    expect(String((err as { hint?: string }).hint)).toContain("--kernel PATH --initrd PATH");
  });

  it.skipIf(!hasApt)("names an unknown package clearly", async () => {
    const err = await fetchPackage("typevisor-no-such-package-xyz", { cache: join(tmpdir(), "tv-unused-cache") }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: expect.stringMatching(/^(DEBIAN_PACKAGE_UNKNOWN|APT_LISTS_EMPTY)$/) });
  });
});

describe("temp dirs of dead builds", () => {
  it("removes temps whose pid is gone and keeps live ones", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tv-temps-"));
    try {
      // a pid that is not running: spawn a process and let it exit
      const dead = spawnSync("true").pid as number;
      expect(pidAlive(dead)).toBe(false);
      const deadTemp = join(dir, `minimal.tmp-${dead}-abc`);
      const liveTemp = tempName(join(dir, "minimal"));
      mkdirSync(deadTemp);
      mkdirSync(liveTemp);
      await removeDeadTemps(dir);
      expect(existsSync(deadTemp)).toBe(false);
      expect(existsSync(liveTemp)).toBe(true);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
