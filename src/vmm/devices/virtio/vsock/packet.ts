/*
 * The virtio-vsock packet header (virtio 1.2 §5.10.6): every packet on the rx and tx queues
 * starts with this little-endian struct, followed by `len` payload bytes for OP_RW.
 */

/** sizeof(struct virtio_vsock_hdr): 44 bytes, packed (virtio 1.2 §5.10.6). */
export const VSOCK_HDR_LEN = 44;

/** Well-known CIDs (virtio 1.2 §5.10.4; vsock(7)): 0 hypervisor, 1 loopback/reserved, 2 the host. */
export const VSOCK_HOST_CID = 2;

/** type (virtio 1.2 §5.10.6): only stream sockets here (SEQPACKET needs VIRTIO_VSOCK_F_SEQPACKET). */
export const VSOCK_TYPE_STREAM = 1;

/** op (virtio 1.2 §5.10.6). */
export const VSOCK_OP = {
  INVALID: 0,
  REQUEST: 1,
  RESPONSE: 2,
  RST: 3,
  SHUTDOWN: 4,
  RW: 5,
  CREDIT_UPDATE: 6,
  CREDIT_REQUEST: 7,
} as const;

/** SHUTDOWN flags (virtio 1.2 §5.10.6.5): the sender will receive / send no more data. */
export const VSOCK_SHUTDOWN_RCV = 1;
export const VSOCK_SHUTDOWN_SEND = 2;

/** struct virtio_vsock_event id (virtio 1.2 §5.10.6.6): the guest must drop every connection. */
export const VSOCK_EVENT_TRANSPORT_RESET = 0;

export interface VsockHeader {
  srcCid: bigint;
  dstCid: bigint;
  srcPort: number;
  dstPort: number;
  len: number;
  type: number;
  op: number;
  flags: number;
  bufAlloc: number;
  fwdCnt: number;
}

/** Decode the first 44 bytes of `b` (the caller checked the length). */
export function decodeHeader(b: Uint8Array): VsockHeader {
  const dv = new DataView(b.buffer, b.byteOffset, VSOCK_HDR_LEN);
  return {
    srcCid: dv.getBigUint64(0, true),
    dstCid: dv.getBigUint64(8, true),
    srcPort: dv.getUint32(16, true),
    dstPort: dv.getUint32(20, true),
    len: dv.getUint32(24, true),
    type: dv.getUint16(28, true),
    op: dv.getUint16(30, true),
    flags: dv.getUint32(32, true),
    bufAlloc: dv.getUint32(36, true),
    fwdCnt: dv.getUint32(40, true),
  };
}

/** Encode `h` into the first 44 bytes of `b`. */
export function encodeHeader(h: VsockHeader, b: Uint8Array): void {
  const dv = new DataView(b.buffer, b.byteOffset, VSOCK_HDR_LEN);
  dv.setBigUint64(0, BigInt.asUintN(64, h.srcCid), true);
  dv.setBigUint64(8, BigInt.asUintN(64, h.dstCid), true);
  dv.setUint32(16, h.srcPort >>> 0, true);
  dv.setUint32(20, h.dstPort >>> 0, true);
  dv.setUint32(24, h.len >>> 0, true);
  dv.setUint16(28, h.type & 0xffff, true);
  dv.setUint16(30, h.op & 0xffff, true);
  dv.setUint32(32, h.flags >>> 0, true);
  dv.setUint32(36, h.bufAlloc >>> 0, true);
  dv.setUint32(40, h.fwdCnt >>> 0, true);
}
