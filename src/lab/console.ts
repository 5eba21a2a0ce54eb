/**
 * The lab talks to the host over its serial console only. The lab init prints markers carrying a
 * per-run nonce (so command output cannot fake them):
 *   @@TVLAB:<nonce>:start@@        the command starts now
 *   @@TVLAB:<nonce>:exit:<code>@@  the command ended with <code>
 *   @@TVLAB:<nonce>:error:<msg>@@  the lab could not set up (no /dev/kvm, 9p mount failed, ...)
 * ConsoleFilter splits the byte stream: boot chatter goes to the log only, command output between
 * start and exit is passed through, markers are removed. Strings hold bytes as latin1 so that any
 * byte sequence (including UTF-8 split across chunks) passes through unchanged.
 */

export type ConsoleEvent =
  | { kind: "start" }
  | { kind: "exit"; code: number }
  | { kind: "error"; message: string };

export type LabPhase = "boot" | "running" | "done";

export class ConsoleFilter {
  readonly prefix: string;
  phase: LabPhase = "boot";
  private held = "";
  /** The init's echo ends the start marker line with a newline that is not command output. */
  private dropNewline = false;

  constructor(nonce: string) {
    if (!/^[A-Za-z0-9]+$/.test(nonce)) throw new Error(`bad lab nonce ${nonce}`);
    this.prefix = `@@TVLAB:${nonce}:`;
  }

  /** Feed console bytes (latin1 string); returns the command output to pass on and the markers seen. */
  push(chunk: string): { output: string; events: ConsoleEvent[] } {
    let text = this.held + chunk;
    this.held = "";
    let output = "";
    const events: ConsoleEvent[] = [];
    while (text.length > 0 && this.phase !== "done") {
      if (this.dropNewline) {
        if (text === "\r") {
          this.held = text; // wait for the next chunk to tell "\r\n" from output starting with "\r"
          return { output, events };
        }
        if (text.startsWith("\r\n")) text = text.slice(2);
        else if (text.startsWith("\n")) text = text.slice(1);
        this.dropNewline = false;
        continue;
      }
      const at = text.indexOf(this.prefix);
      if (at < 0) {
        // keep back a tail that could be the start of a marker split across chunks
        const keep = this.partialPrefixLength(text);
        if (this.phase === "running") output += text.slice(0, text.length - keep);
        this.held = text.slice(text.length - keep);
        return { output, events };
      }
      const end = text.indexOf("@@", at + this.prefix.length);
      if (end < 0) {
        if (this.phase === "running") output += text.slice(0, at);
        this.held = text.slice(at);
        // a marker is short: anything much longer without a closing @@ is not one
        if (this.held.length > 4096) {
          if (this.phase === "running") output += this.held;
          this.held = "";
        }
        return { output, events };
      }
      if (this.phase === "running") output += text.slice(0, at);
      const body = text.slice(at + this.prefix.length, end);
      text = text.slice(end + 2);
      const ev = parseMarker(body);
      if (ev === undefined) continue;
      events.push(ev);
      if (ev.kind === "start") {
        this.phase = "running";
        this.dropNewline = true;
      } else {
        this.phase = "done";
      }
    }
    return { output, events };
  }

  private partialPrefixLength(text: string): number {
    for (let n = Math.min(this.prefix.length - 1, text.length); n > 0; n--) {
      if (this.prefix.startsWith(text.slice(text.length - n))) return n;
    }
    return 0;
  }
}

export function parseMarker(body: string): ConsoleEvent | undefined {
  if (body === "start") return { kind: "start" };
  const exit = /^exit:(\d{1,3})$/.exec(body);
  if (exit?.[1] !== undefined) return { kind: "exit", code: Number(exit[1]) };
  if (body.startsWith("error:")) return { kind: "error", message: body.slice("error:".length) };
  return undefined;
}
