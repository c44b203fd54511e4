/**
 * OpenAI logprobs from the engine's token events: the legacy completions shape
 * {tokens, token_logprobs, top_logprobs, text_offset} and the chat shape {content: [{token, logprob,
 * bytes, top_logprobs}], refusal}.
 */
import type { TokenInfo } from '../engine/engine-types.js';

/** One generated token with its alternatives, at `offset` characters into the answer text. */
export interface LogprobEntry {
  token: string;
  readonly logprob: number;
  readonly alternatives: readonly TokenInfo[];
  offset: number;
  /** The token's id: its own bytes are looked up when rendered (its text may lack part of a character). */
  readonly id: number;
  /** The prompt's first token: nothing scores it (logprob and top_logprobs null). */
  readonly prompt?: boolean;
  /** One of the prompt's tokens (echo). */
  readonly inPrompt?: boolean;
  /** A generated special token (eos): no text of its own in the answer. */
  readonly special?: boolean;
  /** A generated token's index among the generated tokens (specials counted). */
  readonly generated?: number;
}

/** OpenAI's stand-in for a log probability of −∞ (JSON has no infinity). */
const FLOOR = -9999;

const finite = (logprob: number): number => (Number.isFinite(logprob) ? logprob : FLOOR);
const utf8Of = (text: string): number[] => [...Buffer.from(text, 'utf8')];

/** {text: logprob} of the alternatives (best first): two tokens that decode alike keep the better one's. */
function topByText(alternatives: readonly TokenInfo[]): Record<string, number> {
  const top: Record<string, number> = {};
  for (const a of alternatives) if (!Object.hasOwn(top, a.text)) top[a.text] = finite(a.logprob);
  return top;
}

/**
 * Whether `entry` belongs to the returned answer ending at `textEnd`: a prompt token; with `stopToken` (where a
 * stop sequence starts), a token before it, or the one it starts in when that token's text begins in the answer;
 * else a token starting before `textEnd`, or a special one (eos) at it.
 */
export function inAnswer(entry: LogprobEntry, textEnd: number, stopToken?: number): boolean {
  if (entry.inPrompt) return true;
  if (stopToken !== undefined && entry.generated !== undefined) {
    return entry.generated < stopToken || (entry.generated === stopToken && !entry.special && entry.offset < textEnd);
  }
  return entry.offset < textEnd || (entry.special === true && entry.offset <= textEnd);
}

/** Collects a stream of tokens and renders them in one OpenAI dialect. */
export class LogprobCollector {
  private offset: number;
  private readonly entries: LogprobEntry[] = [];
  /** Generated tokens added so far, listed or not. */
  private generated = 0;

  /** `startOffset`: where the answer starts in the returned text (the prompt's length when it is echoed). */
  /**
   * `tokenBytes`: a token's own bytes (the engine's), looked up only for what is rendered; without it a
   * token's bytes are its text's.
   */
  constructor(private readonly dialect: 'completion' | 'chat', startOffset = 0, private readonly tokenBytes?: (id: number) => readonly number[]) {
    this.offset = startOffset;
  }

  /**
   * Puts the prompt's tokens first (echo): their logprobs (the first token has none: null in the render) and
   * top alternatives, each with the text it adds to `echoed` (the prompt as returned) at its offset there. The
   * texts come from the tokens' own bytes decoded in sequence, so tokens that split a character add up to it;
   * a token whose text is not in `echoed` (BOS, added by the tokenizer) has none.
   */
  addPrompt(prompt: readonly TokenInfo[], alternatives: readonly (readonly TokenInfo[])[] | undefined, echoed: string): void {
    const decoder = new TextDecoder('utf-8');
    let offset = 0;
    const entries = prompt.map((token, i): LogprobEntry => {
      const piece = this.tokenBytes ? decoder.decode(Uint8Array.from(this.tokenBytes(token.id)), { stream: true }) : token.text;
      let text = piece;
      if (!echoed.startsWith(piece, offset)) {
        if (token.special) text = ''; // added by the tokenizer: not part of the text
        else if (piece.startsWith(' ') && echoed.startsWith(piece.slice(1), offset)) text = piece.slice(1); // SentencePiece's ▁ at the start
        else text = echoed.slice(offset, offset + piece.length); // a normalisation the decoder undoes: the text as returned
      }
      const entry: LogprobEntry = { id: token.id, token: text, logprob: token.logprob, alternatives: alternatives?.[i] ?? [], offset, prompt: i === 0, inPrompt: true };
      offset += text.length;
      return entry;
    });
    // what the decoder still holds (a prompt ending inside a character) goes to the last token with text
    const last = [...entries].reverse().find((e) => !e.prompt && e.token !== '') ?? entries.at(-1);
    if (last && offset < echoed.length) last.token += echoed.slice(offset);
    this.entries.unshift(...entries);
  }

  /**
   * Adds the next generated token and returns its entry, numbered among the generated tokens. A special one (eos)
   * adds no text: it stands at the text's end under its own name (completions list it, as a loglikelihood client
   * counts on; chat leaves it out: null).
   */
  add(token: TokenInfo, alternatives: readonly TokenInfo[] = []): LogprobEntry | null {
    const generated = this.generated++;
    if (token.special && this.dialect === 'chat') return null;
    const entry: LogprobEntry = { id: token.id, token: token.text, logprob: token.logprob, alternatives, offset: this.offset, generated, ...(token.special ? { special: true } : {}) };
    if (!token.special) this.offset += token.text.length;
    this.entries.push(entry);
    return entry;
  }

  /**
   * Gives the last token the text the decoder only let go at the end (the bytes of an unfinished UTF-8
   * character, as U+FFFD), so the tokens add up to `answer` (the generated text, from the answer's start).
   */
  finish(answer: string, answerStart = 0): void {
    const last = [...this.entries].reverse().find((e) => !e.special && !e.inPrompt);
    const covered = this.offset - answerStart;
    if (last && answer.length > covered) {
      last.token += answer.slice(covered);
      this.offset += answer.length - covered;
      // a special token after it (eos) stands at the text's end, which moved
      for (const entry of this.entries.slice(this.entries.indexOf(last) + 1)) if (entry.special) entry.offset = this.offset;
    }
  }

  /**
   * The prompt's tokens, and every generated token that starts before `textEnd` (where the returned text ends:
   * a stop sequence cuts the tokens after it), a special one at the end included. With `stopToken` (the done
   * event's: the generated token a stop sequence starts in), the generated tokens before it: a special token
   * that begins the stop stands at the text's end too, and is the stop's, not the answer's.
   */
  all(textEnd = Number.POSITIVE_INFINITY, stopToken?: number): LogprobEntry[] {
    return this.entries.filter((e) => inAnswer(e, textEnd, stopToken));
  }

  private bytesOf(id: number, text: string): number[] {
    return this.tokenBytes ? [...this.tokenBytes(id)] : utf8Of(text);
  }

  /** `entries` in this collector's dialect. */
  render(entries: readonly LogprobEntry[]): Record<string, unknown> {
    if (this.dialect === 'completion') {
      return {
        tokens: entries.map((e) => e.token),
        token_logprobs: entries.map((e) => (e.prompt ? null : finite(e.logprob))),
        top_logprobs: entries.map((e) => (e.prompt ? null : topByText(e.alternatives))),
        text_offset: entries.map((e) => e.offset),
      };
    }
    return {
      content: entries.map((e) => ({
        token: e.token,
        logprob: finite(e.logprob),
        bytes: this.bytesOf(e.id, e.token),
        top_logprobs: e.alternatives.map((a) => ({ token: a.text, logprob: finite(a.logprob), bytes: this.bytesOf(a.id, a.text) })),
      })),
      refusal: null,
    };
  }
}
