/**
 * Guest output made safe for an operator's terminal. What a guest prints on its serial console is
 * hostile input: escape sequences (ESC, or the 8-bit CSI U+009B) can move the cursor, rewrite the
 * screen, set the window title, or on some terminals answer back as if typed. `vm logs` and
 * `events` show control characters as visible escapes (`\x1b`, `\u009b`) unless told `--raw`;
 * newline, tab and carriage return pass (console output is full of "\r\n").
 */
import { StringDecoder } from "node:string_decoder";

/** C0 controls but \t \n \r, DEL, and the C1 controls U+0080-U+009F (ECMA-48 §5). */
// eslint-disable-next-line no-control-regex -- matching control characters is the point
const UNSAFE = /[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]/g;

const escapeOne = (c: string): string => {
  const n = c.charCodeAt(0);
  return n < 0x80 ? `\\x${n.toString(16).padStart(2, "0")}` : `\\u${n.toString(16).padStart(4, "0")}`;
};

export function escapeControls(text: string): string {
  return text.replace(UNSAFE, escapeOne);
}

/** A byte stream to safe text, chunk by chunk: a UTF-8 sequence split across chunks is kept whole. */
export class TerminalSafeStream {
  private readonly decoder = new StringDecoder("utf8");

  push(chunk: Buffer): string {
    return escapeControls(this.decoder.write(chunk));
  }

  end(): string {
    return escapeControls(this.decoder.end());
  }
}
