/**
 * A damaged inventory (a row edited by hand, or written by another version) must neither stop the
 * daemon nor be acted on: the row is quarantined (left alone, said so in an event, its directory
 * kept), the other VMs are managed as before, and `vm rm` removes it. A real daemon on a real
 * SQLite file, damaged with better-sqlite3 between two daemon runs.
 */
import { existsSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import Database from "better-sqlite3";
import { afterAll, describe, expect, it } from "vitest";
import { ApiError } from "../../src/api/client.js";
import { startDaemon, type TestDaemon } from "../helpers/daemon.js";
import { writeTinyKernel } from "../helpers/tiny-kernel.js";

const hasKvm = existsSync("/dev/kvm");
const built = existsSync(new URL("../../dist/cli/main.js", import.meta.url));

describe.skipIf(!hasKvm || !built)("an inventory with rows the daemon cannot read", () => {
  let d: TestDaemon | undefined;
  afterAll(async () => {
    await d?.stop();
  });

  it("quarantines a malformed spec and an unknown state, manages the rest, and vm rm removes them", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tvq-"));
    const kernel = join(dir, "tiny.bin");
    writeTinyKernel(kernel);
    const home = join(dir, "home");
    const args = ["--force-kvm", "--allow-files", dir];
    d = await startDaemon({ home, args });
    for (const name of ["good", "badspec", "badstate"]) await d.client.createVm({ name, kernel, memoryMiB: 64, rng: false });
    const dirs = Object.fromEntries((await d.client.listVms()).map((v) => [v.name, `${home}/vms/${v.id}`]));
    await d.stop();

    const db = new Database(join(home, "typevisor.db"));
    db.prepare("UPDATE vms SET spec = ? WHERE name = ?").run("{not json", "badspec");
    db.prepare("UPDATE vms SET state = ? WHERE name = ?").run("zombie", "badstate");
    db.close();

    d = await startDaemon({ home, args });
    expect((await d.client.listVms()).map((v) => v.name)).toEqual(["good"]);
    const err = await d.client.getVm("badstate").catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ApiError);
    expect(err).toMatchObject({ status: 409, code: "VM_QUARANTINED" });
    // Its name stays taken, and its directory stays (the start-up sweep removes only what nothing names).
    await expect(d.client.createVm({ name: "badspec", kernel, memoryMiB: 64 })).rejects.toMatchObject({ status: 409 });
    expect(existsSync(dirs["badspec"]!)).toBe(true);
    const events = await d.client.events({ limit: 1000 });
    expect(events.filter((e) => e.type === "daemon.quarantine").map((e) => e.data?.["vm"]).sort()).toEqual(["badspec", "badstate"]);
    // The sound VM is managed as before.
    await d.client.startVm("good");
    await d.client.stopVm("good", { force: true });
    // vm rm takes a quarantined row and its directory.
    await d.client.removeVm("badspec");
    await d.client.removeVm("badstate");
    expect(existsSync(dirs["badspec"]!)).toBe(false);
    expect((await d.client.listVms()).map((v) => v.name)).toEqual(["good"]);
    await d.client.createVm({ name: "badspec", kernel, memoryMiB: 64, rng: false });
  });
});
