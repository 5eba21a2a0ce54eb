/**
 * Alert webhooks (docs/control-plane.md, "Metrics history and alerts"): each alert.firing and
 * alert.resolved event is POSTed as JSON to every `--alert-webhook` URL, in order, one at a time
 * per URL. A failed attempt (no answer in 10 s, or not a 2xx) is retried with exponential backoff
 * (base, 2x, 4x, ... up to `attempts` tries); then the event is given up on and the failure is
 * reported (onGiveUp: an alert.webhook-failed event). What each URL did last is visible
 * (status(): GET /v1/alerts/webhooks). The queue per URL is bounded: a receiver that is down for
 * long loses the oldest events first, counted in `dropped`.
 */
import type { EventRecord } from "./spec.js";

export const WEBHOOK_QUEUE_MAX = 1000;
const ATTEMPT_TIMEOUT_MS = 10_000;

export interface WebhookStatus {
  /** The URL without its query or credentials (those may hold a secret). */
  url: string;
  delivered: number;
  failedAttempts: number;
  givenUp: number;
  dropped: number;
  queued: number;
  lastSuccessAt?: string;
  lastError?: { at: string; message: string };
}

interface Hook {
  url: string;
  status: WebhookStatus;
  queue: EventRecord[];
  busy: boolean;
}

/** The URL as shown: scheme, host and path only. */
export function shownUrl(u: string): string {
  const p = new URL(u);
  return `${p.protocol}//${p.host}${p.pathname}`;
}

export class Webhooks {
  private readonly hooks: Hook[];
  private closed = false;

  constructor(
    urls: readonly string[],
    private readonly opts: { baseDelayMs: number; attempts: number; onGiveUp: (url: string, e: EventRecord, message: string) => void },
  ) {
    this.hooks = urls.map((url) => ({ url, queue: [], busy: false, status: { url: shownUrl(url), delivered: 0, failedAttempts: 0, givenUp: 0, dropped: 0, queued: 0 } }));
  }

  status(): WebhookStatus[] {
    return this.hooks.map((h) => ({ ...h.status, queued: h.queue.length }));
  }

  deliver(e: EventRecord): void {
    for (const h of this.hooks) {
      if (h.queue.length >= WEBHOOK_QUEUE_MAX) {
        h.queue.shift();
        h.status.dropped++;
      }
      h.queue.push(e);
      if (!h.busy) void this.drain(h);
    }
  }

  close(): void {
    this.closed = true;
  }

  private async drain(h: Hook): Promise<void> {
    h.busy = true;
    try {
      while (h.queue.length > 0 && !this.closed) {
        const e = h.queue[0]!;
        let last = "";
        let ok = false;
        for (let attempt = 0; attempt < this.opts.attempts && !this.closed; attempt++) {
          if (attempt > 0) await sleep(this.opts.baseDelayMs * 2 ** (attempt - 1));
          try {
            const res = await fetch(h.url, {
              method: "POST",
              headers: { "content-type": "application/json", "user-agent": "typevisor" },
              body: JSON.stringify(e),
              signal: AbortSignal.timeout(ATTEMPT_TIMEOUT_MS),
              redirect: "error",
            });
            await res.arrayBuffer().catch(() => undefined);
            if (res.ok) {
              ok = true;
              break;
            }
            last = `HTTP ${res.status}`;
          } catch (err) {
            last = (err as Error).cause instanceof Error ? ((err as Error).cause as Error).message : (err as Error).message;
          }
          h.status.failedAttempts++;
          h.status.lastError = { at: new Date().toISOString(), message: last };
        }
        // the event may have been dropped from the front while this one was being sent
        if (h.queue[0] === e) h.queue.shift();
        if (ok) {
          h.status.delivered++;
          h.status.lastSuccessAt = new Date().toISOString();
        } else if (!this.closed) {
          h.status.givenUp++;
          this.opts.onGiveUp(h.status.url, e, last);
        }
      }
    } finally {
      h.busy = false;
    }
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms).unref());
}
