import { execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import * as libc from "../../../../sys/libc.js";
import { openTap, setLinkUp } from "../../../../sys/tap.js";
import type { TapHandle } from "../../../../sys/tap.js";
import { GuestMemory } from "../../../memory/guest-memory.js";
import type { ActivateContext } from "../device.js";
import { featureBit, VIRTIO_F } from "../device.js";
import { QueueDriver } from "../queue/driver.js";
import { macFromIdentity } from "./mac.js";
import { NetDevice, RXQ, TXQ, VIRTIO_NET_F, VNET_HDR_LEN } from "./net.js";

/*
 * A real round trip through the host's network stack, no mocks: the test plays the guest's
 * driver, transmits an ARP request for the TAP's address, and the Linux kernel's ARP reply
 * comes back through the receive queue. Needs root (CAP_NET_ADMIN), /dev/net/tun and iproute2.
 */
const ipBin = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip"].find((p) => existsSync(p));
function tapPossible(): boolean {
  if (ipBin === undefined || !existsSync("/dev/net/tun")) return false;
  try {
    libc.close(openTap(`tvnp${process.pid % 100000}`).fd);
    return true;
  } catch {
    return false;
  }
}
const ok = tapPossible();

const HOST_IP = [169, 254, 77, 1];
const GUEST_IP = [169, 254, 77, 2];
const GUEST_MAC = macFromIdentity("net-tap-test");

/** Ethernet + ARP request "who has HOST_IP? tell GUEST_IP" (RFC 826), 42 bytes. */
function arpRequest(): Uint8Array {
  const f = new Uint8Array(42);
  f.fill(0xff, 0, 6);
  f.set(GUEST_MAC, 6);
  f.set([0x08, 0x06], 12); // ethertype ARP
  f.set([0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01], 14); // Ethernet/IPv4, request
  f.set(GUEST_MAC, 22);
  f.set(GUEST_IP, 28);
  f.set(HOST_IP, 38);
  return f;
}

describe.skipIf(!ok)("NetDevice on a real TAP (root)", () => {
  const name = `tvnet${process.pid % 100000}`;
  let tap: TapHandle;
  beforeAll(() => {
    tap = openTap(name);
    setLinkUp(tap.name);
    execFileSync(ipBin!, ["addr", "add", `${HOST_IP.join(".")}/24`, "dev", tap.name]);
  });
  afterAll(() => {
    libc.close(tap.fd); // a TAP we created vanishes with its fd
  });

  for (const mrg of [true, false]) {
    it(`guest ARP request -> Linux -> ARP reply back through rx (MRG_RXBUF ${mrg ? "on" : "off"})`, () => {
      const dev = new NetDevice({ tapFd: tap.fd, mac: GUEST_MAC, queueSize: 64 });
      const size = 1 << 20;
      const mem = new GuestMemory(new ArrayBuffer(size), [{ guestPhysAddr: 0, size, hostOffset: 0 }]);
      const rx = new QueueDriver(mem, 64, 0);
      const tx = new QueueDriver(mem, 64, 0x4000);
      let features = featureBit(VIRTIO_F.VERSION_1) | featureBit(VIRTIO_F.EVENT_IDX) | featureBit(VIRTIO_NET_F.MAC) | featureBit(VIRTIO_NET_F.STATUS);
      if (mrg) features |= featureBit(VIRTIO_NET_F.MRG_RXBUF);
      const interrupts: number[] = [];
      const resets: string[] = [];
      const ctx: ActivateContext = {
        mem,
        queues: [rx.config, tx.config],
        features,
        interruptQueue: (q) => interrupts.push(q),
        interruptConfig: () => undefined,
        needsReset: (r) => resets.push(r),
      };
      dev.activate(ctx);
      // Receive buffers as Linux posts them without offloads: 12 + 1518 bytes.
      for (let k = 0; k < 32; k++) rx.publish(rx.addChain([{ addr: 0x10000 + k * 0x800, len: VNET_HDR_LEN + 1518, write: true }]));
      dev.notify(RXQ);

      // Transmit: header and frame in separate descriptors, as the Linux driver may send them.
      mem.fill(0x40000, VNET_HDR_LEN, 0);
      mem.write(0x41000, arpRequest());
      const head = tx.addChain([
        { addr: 0x40000, len: VNET_HDR_LEN },
        { addr: 0x41000, len: 42 },
      ]);
      tx.publish(head);
      dev.notify(TXQ);
      expect(tx.takeUsed()).toEqual([{ id: head, len: 0 }]);
      expect(dev.stats()).toMatchObject({ txPackets: 1, txDropped: 0 });

      // Serve the TAP the way the device thread does, until the reply shows up (the host may also
      // send IPv6 neighbour/router traffic on a fresh link: skip it).
      const deadline = Date.now() + 5000;
      let reply: Uint8Array | undefined;
      let frames = 0;
      while (reply === undefined && Date.now() < deadline) {
        if (dev.backendWanted(tap.fd) && libc.pollIn([tap.fd], 200).length > 0) dev.onBackendReadable(tap.fd);
        for (const u of rx.takeUsed()) {
          const at = 0x10000 + u.id * 0x800;
          frames++;
          expect(mem.readU16(at + 10)).toBe(1); // num_buffers: one buffer per frame at this size
          expect(mem.readU8(at)).toBe(0); // no checksum/GSO flags without offloads
          const f = mem.read(at + VNET_HDR_LEN, u.len - VNET_HDR_LEN);
          if (f[12] === 0x08 && f[13] === 0x06 && f[21] === 2) reply = f;
        }
      }
      expect(frames).toBeGreaterThan(0);
      expect(reply).toBeDefined();
      const r = reply!;
      expect(Array.from(r.subarray(0, 6))).toEqual(Array.from(GUEST_MAC)); // to us
      expect(Array.from(r.subarray(28, 32))).toEqual(HOST_IP); // sender: the TAP's address
      expect(Array.from(r.subarray(32, 38))).toEqual(Array.from(GUEST_MAC)); // target hw: us
      expect(Array.from(r.subarray(38, 42))).toEqual(GUEST_IP);
      // The sender hardware address is the TAP's MAC, as the host sees it.
      const tapMac = execFileSync(ipBin!, ["-br", "link", "show", "dev", tap.name], { encoding: "utf8" }).split(/\s+/)[2];
      expect(Array.from(r.subarray(22, 28), (b) => b.toString(16).padStart(2, "0")).join(":")).toBe(tapMac);
      expect(interrupts).toContain(RXQ);
      expect(resets).toEqual([]);
      dev.reset();
    });
  }
});
