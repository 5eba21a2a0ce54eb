/** A client of a VMM's console socket (`--console-socket`) that collects everything it receives. */
import { connect, type Socket } from "node:net";

export interface ConsoleClient {
  sock: Socket;
  /** Everything received so far, as latin1 text. */
  text: () => string;
}

export async function consoleClient(path: string): Promise<ConsoleClient> {
  const sock = connect(path);
  let got = "";
  sock.on("data", (d: Buffer) => (got += d.toString("latin1")));
  await new Promise<void>((resolve, reject) => {
    sock.once("connect", () => resolve());
    sock.once("error", reject);
  });
  return { sock, text: () => got };
}
