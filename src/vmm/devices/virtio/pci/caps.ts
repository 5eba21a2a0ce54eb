/**
 * Constants of the virtio-pci modern transport (virtio 1.2 §4.1) and the
 * builder for its vendor-specific capabilities (§4.1.4).
 */

/** PCI vendor of every virtio device; device ID = 0x1040 + device type for non-transitional devices (§4.1.2). */
export const VIRTIO_PCI_VENDOR_ID = 0x1af4;
export const VIRTIO_PCI_DEVICE_ID_BASE = 0x1040;
/** Non-transitional devices SHOULD have revision >= 1 (§4.1.2.1). */
export const VIRTIO_PCI_REVISION = 1;
/**
 * Subsystem IDs: the vendor is the virtio one; non-transitional devices SHOULD
 * use a subsystem device ID of 0x40 or higher (§4.1.2.1), so 0x40 + device type
 * keeps that rule and still tells device types apart in lspci.
 */
export const VIRTIO_PCI_SUBSYSTEM_BASE = 0x40;

/** Vendor-specific capability ID (PCI Local Bus 3.0 §6.7, Appendix H). */
export const PCI_CAP_ID_VNDR = 0x09;

/** cfg_type values (§4.1.4). */
export const VIRTIO_PCI_CAP = {
  COMMON_CFG: 1,
  NOTIFY_CFG: 2,
  ISR_CFG: 3,
  DEVICE_CFG: 4,
  PCI_CFG: 5,
} as const;

/** Device status bits (§2.1). */
export const VIRTIO_STATUS = {
  ACKNOWLEDGE: 1,
  DRIVER: 2,
  DRIVER_OK: 4,
  FEATURES_OK: 8,
  DEVICE_NEEDS_RESET: 64,
  FAILED: 128,
} as const;

/** "No vector" for config_msix_vector / queue_msix_vector (§4.1.5.1.2). */
export const VIRTIO_MSI_NO_VECTOR = 0xffff;

/** ISR status bits (§4.1.4.5). */
export const VIRTIO_ISR = { QUEUE: 1, CONFIG: 2 } as const;

/** struct virtio_pci_common_cfg field offsets (§4.1.4.3). */
export const COMMON = {
  DEVICE_FEATURE_SELECT: 0x00,
  DEVICE_FEATURE: 0x04,
  DRIVER_FEATURE_SELECT: 0x08,
  DRIVER_FEATURE: 0x0c,
  CONFIG_MSIX_VECTOR: 0x10,
  NUM_QUEUES: 0x12,
  DEVICE_STATUS: 0x14,
  CONFIG_GENERATION: 0x15,
  QUEUE_SELECT: 0x16,
  QUEUE_SIZE: 0x18,
  QUEUE_MSIX_VECTOR: 0x1a,
  QUEUE_ENABLE: 0x1c,
  QUEUE_NOTIFY_OFF: 0x1e,
  QUEUE_DESC: 0x20,
  QUEUE_DRIVER: 0x28,
  QUEUE_DEVICE: 0x30,
  /**
   * End of the fields we implement. queue_notify_data and queue_reset (0x38,
   * 0x3a) exist only with VIRTIO_F_NOTIF_CONFIG_DATA / VIRTIO_F_RING_RESET,
   * which this transport does not offer, and Linux accepts a common
   * capability of this minimum length.
   */
  LENGTH: 0x38,
} as const;

/**
 * Feature bits that belong to the transport rather than the device and that
 * this transport does not implement (virtio 1.2 §6): SR_IOV (37),
 * NOTIFICATION_DATA (38), NOTIF_CONFIG_DATA (39), RING_RESET (40), ADMIN_VQ
 * (41, virtio 1.3). A device model offering one is masked here.
 */
export const TRANSPORT_UNSUPPORTED_FEATURES = (0x1fn << 37n) as bigint;

/**
 * One struct virtio_pci_cap body (everything after cap_vndr and cap_next):
 * cap_len, cfg_type, bar, id, 2 padding bytes, offset, length, then `extra`
 * (notify_off_multiplier for NOTIFY_CFG, pci_cfg_data for PCI_CFG).
 */
export function virtioCapBody(cfgType: number, bar: number, offset: number, length: number, extra: Uint8Array = new Uint8Array(0)): Uint8Array {
  const body = new Uint8Array(14 + extra.length);
  const view = new DataView(body.buffer);
  body[0] = 16 + extra.length;
  body[1] = cfgType;
  body[2] = bar;
  body[3] = 0;
  view.setUint32(6, offset, true);
  view.setUint32(10, length, true);
  body.set(extra, 14);
  return body;
}
