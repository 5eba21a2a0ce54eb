/**
 * A rehearsal of virtio-net's queue code on scratch memory, for a device thread that will soon
 * put a live NIC's state back (a migration's destination, while memory streams in: device-thread.ts).
 *
 * Why: in a fresh worker every function runs for the first time when it is first called, and V8
 * first parses and compiles it then. In the lab the destination's NIC restore (in the guest's
 * pause) took 19-127 ms and the device thread's first look at the restored queues 130-420 ms
 * after the release, that first run among it; a frame the guest queued before the pause waits
 * behind the look (docs/benchmarks.md, "The gap across the switch-over"). Run once here, off the
 * pause, the same code is compiled and has its type feedback when the real state comes (in the
 * lab the look's median fell from 347 to 122 ms: "The destination's network code rehearsed").
 *
 * What runs: a NIC activated with every feature it offers (as Linux negotiates them) transmits a
 * frame, receives one, and answers an announce acknowledgement on its control queue; its state is
 * saved and put back into a second NIC (the live restore), which serves its queues as a restored
 * device's first look does and moves a frame each way again; its state then is a live NIC's (for
 * the caller to warm the state checker's queue schemas with). Nothing here touches the VM: the
 * memory is a scratch buffer and the "TAP" an AF_UNIX datagram pair, both gone afterwards.
 */
import { close, datagramPair, readRaw, writeRaw } from "../../../../sys/libc.js";
import { GuestMemory } from "../../../memory/guest-memory.js";
import type { ActivateContext } from "../device.js";
import { QueueDriver } from "../queue/driver.js";
import { CTRLQ, NetDevice, RXQ, TXQ, VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, VNET_HDR_LEN, type NetDeviceState } from "./net.js";

/** Scratch layout: the three queues, then receive buffers, frames to send and the control command. */
const SCRATCH = 256 * 1024;
const RX_AT = 0x0000;
const TX_AT = 0x2000;
const CTRL_AT = 0x4000;
const RX_BUFS_AT = 0x10000;
const RX_BUF_LEN = 2048;
const TX_FRAME_AT = 0x20000;
const CTRL_CMD_AT = 0x30000;
/** A minimal Ethernet frame (what is in it does not matter to the device). */
const FRAME_LEN = 64;
/** Locally administered, never on a wire. */
const MAC = Uint8Array.of(0x02, 0, 0, 0, 0, 0x01);

/** What the rehearsal moved (each 2 when every path ran; the test checks it). */
export interface NetRehearsal {
  sent: number;
  received: number;
  acked: number;
  /** The restored NIC's own state once it had served its queues: a live NIC's, as a snapshot or a migration carries it. */
  state: NetDeviceState;
}

export function rehearseNet(): NetRehearsal {
  const [devFd, hostFd] = datagramPair();
  try {
    const mem = new GuestMemory(new ArrayBuffer(SCRATCH), [{ guestPhysAddr: 0, size: SCRATCH, hostOffset: 0 }]);
    const first = new NetDevice({ tapFd: devFd, mac: MAC });
    const [rx, tx, ctrl] = [new QueueDriver(mem, first.queueMaxSizes[RXQ]!, RX_AT), new QueueDriver(mem, first.queueMaxSizes[TXQ]!, TX_AT), new QueueDriver(mem, first.queueMaxSizes[CTRLQ]!, CTRL_AT)];
    const ctx: ActivateContext = {
      mem,
      queues: [rx.config, tx.config, ctrl.config],
      features: first.features,
      interruptQueue: () => undefined,
      interruptConfig: () => undefined,
      needsReset: () => undefined,
    };
    const out = { sent: 0, received: 0, acked: 0 };
    const hostBuf = new Uint8Array(VNET_HDR_LEN + RX_BUF_LEN);
    /** One frame each way through `dev`, and an announce ACK on its control queue. */
    const exchange = (dev: NetDevice, round: number): void => {
      // Transmit: a zeroed virtio_net_hdr and the frame, as one readable chain (§5.1.6.2).
      mem.fill(TX_FRAME_AT, VNET_HDR_LEN + FRAME_LEN, round);
      mem.fill(TX_FRAME_AT, VNET_HDR_LEN, 0);
      tx.publish(tx.addChain([{ addr: TX_FRAME_AT, len: VNET_HDR_LEN + FRAME_LEN }]));
      dev.notify(TXQ);
      out.sent += tx.takeUsed().length;
      while (readRaw(hostFd, hostBuf) > 0);
      // Receive: buffers posted, a frame from the "TAP", the device's wake-up for its back end.
      for (let k = 0; k < 2; k++) rx.publish(rx.addChain([{ addr: RX_BUFS_AT + k * RX_BUF_LEN, len: RX_BUF_LEN, write: true }]));
      dev.notify(RXQ);
      hostBuf.fill(0, 0, VNET_HDR_LEN);
      hostBuf.fill(round, VNET_HDR_LEN, VNET_HDR_LEN + FRAME_LEN);
      writeRaw(hostFd, hostBuf.subarray(0, VNET_HDR_LEN + FRAME_LEN));
      dev.onBackendReadable(devFd);
      out.received += rx.takeUsed().length;
      // Control: class ANNOUNCE, command ACK, then the device's one-byte status (§5.1.6.5.4).
      mem.writeU8(CTRL_CMD_AT, VIRTIO_NET_CTRL_ANNOUNCE);
      mem.writeU8(CTRL_CMD_AT + 1, VIRTIO_NET_CTRL_ANNOUNCE_ACK);
      ctrl.publish(ctrl.addChain([{ addr: CTRL_CMD_AT, len: 2 }, { addr: CTRL_CMD_AT + 2, len: 1, write: true }]));
      dev.notify(CTRLQ);
      out.acked += ctrl.takeUsed().length;
    };
    first.activate(ctx);
    exchange(first, 1);
    const state = first.save();
    first.reset();
    // The live restore, then what the restored transport's first look does: every queue served.
    const second = new NetDevice({ tapFd: devFd, mac: MAC });
    second.restore(ctx, state);
    for (const q of [RXQ, TXQ, CTRLQ]) second.notify(q);
    exchange(second, 2);
    const live = second.save();
    second.reset();
    return { ...out, state: live };
  } finally {
    close(devFd);
    close(hostFd);
  }
}
