/**
 * A headless console: the VM writes its serial output into a pipe (its
 * consoleFd is the write end, written by vCPU threads), and the main thread
 * reads the other end and fans it out to a rotating log file and to console
 * socket clients. The terminal is then not the console at all, which is what
 * a VMM started by a supervisor (stdin /dev/null, stdout a file) needs.
 */
import { Socket } from "node:net";
import * as libc from "../../sys/libc.js";
import { RotatingLog } from "./rotating-log.js";
import { ConsoleSocket } from "./socket.js";

export interface ConsolePipeOptions {
  /** onDrop: the log's disk refused a write; output is being dropped (RotatingLog). */
  log?: { path: string; maxBytes: number; onDrop?: (code: string) => void };
  /** fd: a listening socket already bound at path, inherited (a sandboxed VMM). */
  socket?: { path: string; fd?: number };
  /** Bytes a socket client typed, for the guest's UART. */
  onInput: (bytes: Uint8Array) => void;
}

export class ConsolePipe {
  /** The fd to hand the Vm as consoleFd. */
  readonly writeFd: number;
  private readonly reader: Socket;
  private readonly ended: Promise<void>;
  private writeClosed = false;

  private constructor(
    fds: [number, number],
    private readonly log: RotatingLog | undefined,
    private readonly socket: ConsoleSocket | undefined,
  ) {
    const [r, w] = fds;
    this.writeFd = w;
    // net.Socket over a pipe fd: libuv reads it non-blocking on the event loop (no thread-pool read parked on it).
    this.reader = new Socket({ fd: r, readable: true, writable: false });
    this.reader.on("data", (d: Buffer) => {
      this.log?.write(d);
      this.socket?.broadcast(d);
    });
    this.ended = new Promise((resolve) => {
      this.reader.once("end", () => resolve());
      this.reader.once("close", () => resolve());
      this.reader.once("error", () => resolve());
    });
  }

  static async open(o: ConsolePipeOptions): Promise<ConsolePipe> {
    const log = o.log !== undefined ? new RotatingLog(o.log.path, o.log.maxBytes, o.log.onDrop) : undefined;
    let socket: ConsoleSocket | undefined;
    try {
      socket = o.socket !== undefined ? await ConsoleSocket.listen(o.socket.path, o.onInput, o.socket.fd) : undefined;
    } catch (e) {
      log?.close();
      throw e;
    }
    return new ConsolePipe(libc.pipe2(), log, socket);
  }

  /** Guest output the log could not take (0 without a log). */
  get droppedBytes(): number {
    return this.log?.droppedBytes ?? 0;
  }

  /**
   * After the last VM is gone: close the write end, deliver everything still in
   * the pipe (the reader sees EOF once it is drained), then close log and socket.
   */
  async close(): Promise<void> {
    if (!this.writeClosed) {
      this.writeClosed = true;
      libc.close(this.writeFd);
    }
    // Bounded: a vCPU thread that somehow still holds the write end must not keep the process alive.
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([this.ended, new Promise((r) => (timer = setTimeout(r, 2000)))]);
    clearTimeout(timer);
    this.reader.destroy();
    this.log?.close();
    await this.socket?.close();
  }
}
