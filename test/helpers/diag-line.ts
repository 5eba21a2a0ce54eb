/**
 * A test's diagnostic as one line that starts with `test-diag:`: bin/test-all.js keeps such lines
 * among the failure lines a CI run's tail shows (test/helpers/unit-stall-report.ts prints them
 * for a test that timed out; a test may print its own, from onTestFailed).
 */

/** What one diagnostic line may hold: the issue tracker folds lines beyond 1,000 characters. */
export const DIAG_LINE_CHARS = 900;

/** `text` as one `test-diag:` line (newlines shown as " | "), cut to DIAG_LINE_CHARS. */
export function diagLine(label: string, text: string): string {
  const one = `test-diag: ${label}: ${text.replace(/\s*\n\s*/g, " | ").trim()}`;
  return one.length > DIAG_LINE_CHARS ? `${one.slice(0, DIAG_LINE_CHARS - 3)}...` : one;
}
