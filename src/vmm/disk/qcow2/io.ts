import { EIO, fdatasync, preadFull, pwriteFull } from "../../../sys/libc.js";

/**
 * A failed host operation inside the qcow2 code, carrying -errno. Thrown deep in a request and
 * caught once at the backend's public methods, which return it (DiskBackend never throws).
 */
export class IoFailure extends Error {
  constructor(readonly errno: number, what: string) {
    super(what);
  }
}

/** Metadata I/O on the image file: whole buffers or an IoFailure. */
export class MetaIo {
  constructor(readonly fd: number) {}

  read(buf: Uint8Array, off: number, what: string): void {
    const r = preadFull(this.fd, buf, off);
    if (r < 0) throw new IoFailure(r, `reading ${what} at ${off}`);
  }

  write(buf: Uint8Array, off: number, what: string): void {
    const r = pwriteFull(this.fd, buf, off);
    if (r < 0) throw new IoFailure(r, `writing ${what} at ${off}`);
  }

  sync(): void {
    const r = fdatasync(this.fd);
    if (r < 0) throw new IoFailure(r, "fdatasync");
  }
}

/** The -errno an exception stands for: an IoFailure's own, anything else EIO. */
export function errnoOf(e: unknown): number {
  return e instanceof IoFailure ? e.errno : -EIO;
}
