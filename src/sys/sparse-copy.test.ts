import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { sparseCopy } from "./sparse-copy.js";

describe("sparseCopy", () => {
  it("says a full destination as ENOSPC with the destination's path (so the daemon names the full file system)", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tv-sparse-"));
    try {
      const src = join(dir, "src");
      writeFileSync(src, Buffer.alloc(65536, 1));
      // /dev/full: every write fails with ENOSPC, a real full device without mounting anything
      await expect(sparseCopy(src, "/dev/full")).rejects.toMatchObject({ code: "ENOSPC", path: "/dev/full" });
    } finally {
      rmSync(dir, { recursive: true });
    }
  });
});
