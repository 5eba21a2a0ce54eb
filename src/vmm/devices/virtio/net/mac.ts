import { createHash } from "node:crypto";
import { TypevisorError } from "../../../../errors.js";

/*
 * Ethernet MAC addresses for guest NICs (IEEE 802-2014 §8.2: bit 0 of the first octet is the
 * individual/group bit, bit 1 the universal/local bit).
 */

/**
 * A stable, locally administered unicast MAC for the VM identity `id`: 02 followed by five bytes
 * of SHA-256(id), so the same VM keeps its address (and its DHCP lease) across restarts while
 * never colliding with a vendor-assigned (universal) address.
 */
export function macFromIdentity(id: string): Uint8Array {
  const h = createHash("sha256").update("typevisor-mac\0").update(id, "utf8").digest();
  const mac = new Uint8Array(6);
  mac[0] = 0x02;
  mac.set(h.subarray(0, 5), 1);
  return mac;
}

/**
 * Parse "aa:bb:cc:dd:ee:ff" (or with '-'). A NIC's own address must be unicast and not all
 * zeros (Linux's is_valid_ether_addr refuses those, and the guest would pick a random one).
 * @throws TypevisorError NET_MAC
 */
export function parseMac(s: string): Uint8Array {
  const m = /^([0-9a-f]{2})([:-])([0-9a-f]{2})\2([0-9a-f]{2})\2([0-9a-f]{2})\2([0-9a-f]{2})\2([0-9a-f]{2})$/i.exec(s.trim());
  if (m === null) throw new TypevisorError("NET_MAC", `MAC address ${JSON.stringify(s)} is not six hex bytes like 02:00:00:12:34:56`);
  const mac = Uint8Array.from([1, 3, 4, 5, 6, 7].map((i) => parseInt(m[i]!, 16)));
  if ((mac[0]! & 1) !== 0) throw new TypevisorError("NET_MAC", `MAC address ${s} is a multicast address; a NIC needs a unicast one (even first byte)`);
  if (mac.every((b) => b === 0)) throw new TypevisorError("NET_MAC", "MAC address 00:00:00:00:00:00 is not a valid NIC address");
  return mac;
}

/** "02:ab:..." lower-case. */
export function formatMac(mac: Uint8Array): string {
  return Array.from(mac, (b) => b.toString(16).padStart(2, "0")).join(":");
}
