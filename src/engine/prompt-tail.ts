/**
 * The part of a prompt text that truncation can keep. With `truncate` N only the last N tokens
 * survive, and they lie within the text's last N × maxTokenChars characters (no token's text is
 * longer), so a long text is tokenized from a tail of that length plus a margin instead of whole:
 * a megabyte prompt with truncate would otherwise hold the event loop for seconds per request.
 */

/** Tokens of margin before the kept ones, so the tail's cut falls in tokens that are dropped. */
export const TRUNCATE_MARGIN_TOKENS = 16;

/**
 * `text`, or its last (truncate + TRUNCATE_MARGIN_TOKENS) × maxTokenChars characters when longer
 * (never starting inside a surrogate pair). The last `truncate` tokens of the tail are those of the
 * whole text unless one word (a pre-tokenizer piece) runs across the cut and into them.
 */
export function promptTail(text: string, truncate: number, maxTokenChars: number | undefined): string {
  if (maxTokenChars === undefined || !Number.isSafeInteger(truncate) || truncate < 1) return text;
  const keep = (truncate + TRUNCATE_MARGIN_TOKENS) * maxTokenChars;
  if (text.length <= keep) return text;
  let start = text.length - keep;
  const code = text.charCodeAt(start);
  if (code >= 0xdc00 && code <= 0xdfff) start += 1; // the second half of a pair: start after it
  return text.slice(start);
}
