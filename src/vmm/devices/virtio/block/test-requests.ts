import * as fs from "node:fs";
import { expect } from "vitest";
import type { GuestMemory } from "../../../memory/guest-memory.js";
import type { QueueDriver } from "../queue/driver.js";
import type { GoodRequest } from "../queue/test-fuzz.js";
import { VIRTIO_BLK_S, VIRTIO_BLK_T } from "./block.js";

/**
 * The well-formed request the block fuzz properties ask a device to serve after a hostile case
 * (runFuzzCase): read sectors 3-4 of `file` and check the bytes, the status and the used length.
 */
export const goodRead =
  (file: string): GoodRequest =>
  (mem: GuestMemory, drv: QueueDriver) => {
    const at = 0x3000;
    mem.writeU32(at, VIRTIO_BLK_T.IN);
    mem.writeU64(at + 8, 3n);
    mem.writeU8(at + 0x600, 0xee);
    const head = drv.addChain([
      { addr: at, len: 16 },
      { addr: at + 0x200, len: 1024, write: true },
      { addr: at + 0x600, len: 1, write: true },
    ]);
    return {
      head,
      check: (len) => {
        expect(len).toBe(1025);
        expect(mem.readU8(at + 0x600)).toBe(VIRTIO_BLK_S.OK);
        expect(Buffer.from(mem.read(at + 0x200, 1024))).toEqual(fs.readFileSync(file).subarray(1536, 2560));
      },
    };
  };
