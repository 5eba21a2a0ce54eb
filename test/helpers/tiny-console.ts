/** The tiny test guest's console through a daemon (test/helpers/tiny-kernel.ts prints the banner and echoes what is typed). */
import type { TypevisorClient } from "../../src/api/client.js";
import { until } from "./daemon.js";
import { TINY_KERNEL_BANNER } from "./tiny-kernel.js";

/** How many times the guest's banner is in the VM's console log (one per boot). */
export const banners = async (c: TypevisorClient, vm: string): Promise<number> => (await c.console(vm)).toString().split(TINY_KERNEL_BANNER).length - 1;

/** Type into a VM's serial console through the daemon; resolves once the tiny guest echoes it back. */
export async function echoes(c: TypevisorClient, vm: string, text: string): Promise<void> {
  const con = await c.attachConsole(vm);
  let seen = "";
  con.on("data", (b: Buffer) => (seen += b.toString()));
  con.write(text);
  try {
    await until(`${vm} echoing ${text}`, () => seen.includes(text) || undefined);
  } finally {
    con.destroy();
  }
}
