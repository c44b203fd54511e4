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
  readonly offset: number;
  /** The token's own bytes when the tokenizer knows them (its text may lack part of a character). */
  readonly bytes?: readonly number[];
  /** The prompt's first token: nothing scores it (logprob and top_logprobs null). */
  readonly prompt?: boolean;
}

/** OpenAI's stand-in for a log probability of −∞ (JSON has no infinity). */
const FLOOR = -9999;

const finite = (logprob: number): number => (Number.isFinite(logprob) ? logprob : FLOOR);
const bytesOf = (text: string): number[] => [...Buffer.from(text, 'utf8')];

/** {text: logprob} of the alternatives (best first): two tokens that decode alike keep the better one's. */
function topByText(alternatives: readonly TokenInfo[]): Record<string, number> {
  const top: Record<string, number> = {};
  for (const a of alternatives) if (!Object.hasOwn(top, a.text)) top[a.text] = finite(a.logprob);
  return top;
}

/** Collects a stream of tokens and renders them in one OpenAI dialect. */
export class LogprobCollector {
  private offset: number;
  private readonly entries: LogprobEntry[] = [];

  /** `startOffset`: where the answer starts in the returned text (the prompt's length when it is echoed). */
  constructor(private readonly dialect: 'completion' | 'chat', startOffset = 0) {
    this.offset = startOffset;
  }

  /**
   * Puts the prompt's tokens first (echo): their logprobs (the first token has none: null in the render) and
   * top alternatives, at offsets from 0 in the echoed text. A special token (BOS) has no text there.
   */
  addPrompt(prompt: readonly TokenInfo[], alternatives: readonly (readonly TokenInfo[])[] | undefined): void {
    let offset = 0;
    const entries = prompt.map((token, i): LogprobEntry => {
      const text = token.special ? '' : token.text;
      const entry = { token: text, logprob: token.logprob, alternatives: alternatives?.[i] ?? [], offset, prompt: i === 0 };
      offset += text.length;
      return entry;
    });
    this.entries.unshift(...entries);
  }

  /** Adds a generated token (not a special one: its text is not part of the answer) and returns its entry. */
  add(token: TokenInfo, alternatives: readonly TokenInfo[] = []): LogprobEntry {
    const entry: LogprobEntry = { token: token.text, logprob: token.logprob, alternatives, offset: this.offset, ...(token.bytes ? { bytes: token.bytes } : {}) };
    this.offset += token.text.length;
    this.entries.push(entry);
    return entry;
  }

  /**
   * Gives the last token the text the decoder only let go at the end (the bytes of an unfinished UTF-8
   * character, as U+FFFD), so the tokens add up to `answer` (the generated text, from the answer's start).
   */
  finish(answer: string, answerStart = 0): void {
    const last = this.entries.at(-1);
    const covered = this.offset - answerStart;
    if (last && answer.length > covered) {
      last.token += answer.slice(covered);
      this.offset += answer.length - covered;
    }
  }

  /** Every token that starts before `textEnd` (where the returned text ends: a stop sequence cuts the tokens after it). */
  all(textEnd = Number.POSITIVE_INFINITY): LogprobEntry[] {
    return this.entries.filter((e) => e.offset < textEnd);
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
        bytes: e.bytes ? [...e.bytes] : bytesOf(e.token),
        top_logprobs: e.alternatives.map((a) => ({ token: a.text, logprob: finite(a.logprob), bytes: a.bytes ? [...a.bytes] : bytesOf(a.text) })),
      })),
      refusal: null,
    };
  }
}
