/**
 * Lab test (real KVM): virtio-net on a TAP. The host side is the lab's real
 * Linux network stack: an address on the TAP, Node's TCP server; the guest
 * uses busybox ping and nc.
 */
import { createHash } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { parseGuestExit, runScriptArg } from "../../src/images/guest-init.js";
import { ConsoleProcess } from "../helpers/console-process.js";
import { tapPeer, type TapPeer } from "../helpers/tap-peer.js";

const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;
const TAP = "tvtest0";
const HOST = "169.254.10.1";
const GUEST = "169.254.10.2";
const MIB = 24;
const sha256 = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");

describe("virtio-net on a TAP under real KVM", () => {
  let peer: TapPeer;
  beforeAll(async () => {
    peer = await tapPeer(TAP, HOST, 5000, MIB * 1024 * 1024);
  });
  afterAll(() => peer.close());

  it("the guest pings the host and moves tens of MiB each way over TCP, checksums intact", async () => {
    const script = [
      `ip addr add ${GUEST}/24 dev eth0`,
      "ip link set eth0 up",
      `ping -c 3 -W 5 ${HOST} >/dev/null && echo ping=ok || echo ping=failed`,
      // The feature bits the driver negotiated, one character per bit from bit 0 (virtio sysfs).
      'echo "features=$(cat /sys/class/net/eth0/device/features)"',
      `nc ${HOST} 5000 > /tmp/in`,
      'echo "in=$(sha256sum /tmp/in | cut -d" " -f1) size=$(wc -c < /tmp/in)"',
      `dd if=/dev/urandom of=/tmp/out bs=1M count=${MIB} 2>/dev/null`,
      'echo "out=$(sha256sum /tmp/out | cut -d" " -f1)"',
      `nc ${HOST} 5001 < /tmp/out`,
    ].join("; ");
    const p = new ConsoleProcess(process.execPath, [
      BIN, "run", "--no-lab", "--no-reboot", "--image", "minimal", "--memory", "512",
      "--net", `tap=${TAP},mac=02:00:00:00:10:02`, "--append", runScriptArg(script),
    ]);
    const code = await p.exited;
    const out = p.output;
    expect(out).toContain("ping=ok");
    // Linux's virtio_net took the control queue and GUEST_ANNOUNCE (virtio 1.2 §5.1.3: bits 17 and
    // 21), which a restored VM uses to announce itself, and the traffic below runs beside it.
    const features = /features=([01]+)/.exec(out)?.[1] ?? "";
    expect([features[17], features[21]]).toEqual(["1", "1"]);
    expect(out).toContain(`in=${sha256(peer.toGuest)} size=${peer.toGuest.length}`);
    const sent = /out=([0-9a-f]{64})/.exec(out)?.[1];
    expect(sent).toBeDefined();
    expect(peer.fromGuest().length).toBe(MIB * 1024 * 1024);
    expect(sha256(peer.fromGuest())).toBe(sent);
    expect(parseGuestExit(out)).toBe(0);
    expect(code).toBe(0);
  });
});
