import { execFileSync, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { GUEST_INIT } from "./guest-init.js";
import { MODULE_LIST } from "./initramfs.js";
import { buildImage, imagePaths, listImages, loadImage, removeImage, validateImageName, type ImageManifest } from "./image.js";
import { parseManifest } from "./manifest.js";
import { dataHome, cacheDir } from "./dirs.js";

const tools = ["apt-get", "dpkg-deb", "mkfs.ext4", "debugfs", "cpio"];
const canBuild = tools.every((t) => spawnSync("sh", ["-c", `command -v ${t}`]).status === 0);

describe("paths and names", () => {
  it("puts images under <home>/images/<name>", () => {
    const p = imagePaths("minimal", "/h");
    expect(p).toEqual({
      dir: "/h/images/minimal",
      kernel: "/h/images/minimal/vmlinuz",
      initrd: "/h/images/minimal/initrd.img",
      rootfs: "/h/images/minimal/rootfs.ext4",
      manifest: "/h/images/minimal/image.json",
    });
  });

  it("rejects names that could escape the images dir", () => {
    for (const bad of ["", "..", "../x", "a/b", "A", ".hidden"]) expect(() => validateImageName(bad)).toThrow(/bad image name/);
  });

  it("follows TYPEVISOR_HOME / XDG_DATA_HOME / HOME and TYPEVISOR_CACHE / XDG_CACHE_HOME", () => {
    expect(dataHome({ TYPEVISOR_HOME: "/a" })).toBe("/a");
    expect(dataHome({ XDG_DATA_HOME: "/x" })).toBe("/x/typevisor");
    expect(dataHome({})).toMatch(/\/\.local\/share\/typevisor$/);
    expect(cacheDir({ TYPEVISOR_CACHE: "/c" })).toBe("/c");
    expect(cacheDir({ XDG_CACHE_HOME: "/y" })).toBe("/y/typevisor");
    expect(cacheDir({ TYPEVISOR_CACHE: "" })).toMatch(/\/\.cache\/typevisor$/);
  });

  it("IMAGE_NOT_FOUND tells how to build one", async () => {
    const home = mkdtempSync(join(tmpdir(), "tv-home-"));
    try {
      await expect(loadImage("minimal", home)).rejects.toMatchObject({ code: "IMAGE_NOT_FOUND", hint: expect.stringContaining("typevisor image build minimal") });
      await expect(removeImage("minimal", home)).rejects.toMatchObject({ code: "IMAGE_NOT_FOUND" });
      await expect(listImages(home)).resolves.toEqual([]);
    } finally {
      rmSync(home, { recursive: true, force: true });
    }
  });

  it("rejects a manifest that does not match the schema", () => {
    expect(() => parseManifest("{", "x.json")).toThrow(/not valid JSON/);
    expect(() => parseManifest(JSON.stringify({ schema: 1, name: "m" }), "x.json")).toThrow(/schema/);
  });
});

describe.skipIf(!canBuild)("buildImage minimal (real Debian packages, shared package cache)", () => {
  let home: string;
  let manifest: ImageManifest;

  beforeAll(async () => {
    home = mkdtempSync(join(tmpdir(), "tv-home-"));
    // a temp dir of a build that died (pid not running) must be cleaned up by this build
    mkdirSync(join(home, "images", `minimal.tmp-${spawnSync("true").pid}-dead`), { recursive: true });
    manifest = await buildImage("minimal", { home });
  }, 300_000);

  afterAll(() => rmSync(home, { recursive: true, force: true }));

  it("writes the four files, and the manifest's sizes and hashes match them", () => {
    const p = imagePaths("minimal", home);
    expect(readdirSync(join(home, "images"))).toEqual(["minimal"]);
    for (const [file, info] of Object.entries(manifest.files)) {
      const data = readFileSync(join(p.dir, file));
      expect(data.length).toBe(info.size);
      expect(createHash("sha256").update(data).digest("hex")).toBe(info.sha256);
    }
    expect(parseManifest(readFileSync(p.manifest, "utf8"), p.manifest)).toEqual(manifest);
    expect(manifest.kernel.package).toMatch(/^linux-image-\d.*-cloud-amd64$/);
    expect(manifest.sources.map((s) => s.package)).toEqual([manifest.kernel.package, "busybox-static"]);
  });

  it("vmlinuz is a bzImage (boot protocol header 'HdrS' at 0x202)", () => {
    const k = readFileSync(imagePaths("minimal", home).kernel);
    expect(k.subarray(0x202, 0x206).toString("latin1")).toBe("HdrS");
  });

  it("initrd.img is an uncompressed newc archive with init, busybox and the modules in its load list", () => {
    const initrd = readFileSync(imagePaths("minimal", home).initrd);
    const names = execFileSync("cpio", ["-it", "--quiet"], { input: initrd }).toString().trim().split("\n");
    expect(names).toContain("init");
    expect(names).toContain("bin/busybox");
    expect(names).toContain("dev/console");
    const list = execFileSync("cpio", ["-i", "--to-stdout", "--quiet", MODULE_LIST], { input: initrd }).toString().trim().split("\n");
    expect(list.length).toBe(manifest.modules.length);
    for (const rel of list) expect(names).toContain(`lib/modules/${manifest.kernel.release}/${rel}`);
    expect(execFileSync("cpio", ["-i", "--to-stdout", "--quiet", "init"], { input: initrd }).toString()).toBe(GUEST_INIT);
  });

  it("rootfs.ext4 holds the same init, busybox, and the rootfs marker (read with debugfs)", () => {
    const fs = imagePaths("minimal", home).rootfs;
    const cat = (p: string): string => execFileSync("debugfs", ["-R", `cat ${p}`, fs], { stdio: ["ignore", "pipe", "ignore"] }).toString();
    expect(cat("/init")).toBe(GUEST_INIT);
    expect(cat("/etc/typevisor/rootfs")).toBe("");
    const stat = execFileSync("debugfs", ["-R", "stat /", fs], { stdio: ["ignore", "pipe", "ignore"] }).toString();
    expect(stat).toMatch(/User:\s+0\s+Group:\s+0/);
    expect(execFileSync("debugfs", ["-R", "ls -l /bin", fs], { stdio: ["ignore", "pipe", "ignore"] }).toString()).toContain("busybox");
  });

  it("does not rebuild an existing image unless forced, and lists and removes it", async () => {
    const again = await buildImage("minimal", { home });
    expect(again.created).toBe(manifest.created);
    expect((await listImages(home)).map((m) => m.name)).toEqual(["minimal"]);
    writeFileSync(join(home, "marker"), "");
    await removeImage("minimal", home);
    expect(existsSync(imagePaths("minimal", home).dir)).toBe(false);
    expect(readdirSync(join(home, "images"))).toEqual([]);
  });
});
