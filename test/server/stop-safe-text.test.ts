/**
 * StopSafeText: what an OpenAI stream sends is always a prefix of the final text, and a stop is where the
 * engine found it (special tokens' text kept; the completing token's event carries the cut), so the stream
 * neither leaks a stop nor stalls on text that only looks like one once special tokens are dropped.
 */
import { describe, expect, it } from 'vitest';
import { StopWindow } from '../../src/engine/stop-window.js';
import { StopSafeText } from '../../src/server/wire.js';

type Token = readonly [text: string, special: string | null];

function stream(stops: readonly string[], tokens: readonly Token[]): { sent: string[]; text: string } {
  const safe = new StopSafeText(stops);
  const engine = new StopWindow(stops); // the engine's matching: its cut rides on the completing token's event
  const sent = tokens.map(([text, special]) => {
    const piece = special === null ? text : '';
    return safe.push(piece, engine.push(piece, special) ?? undefined);
  });
  return { sent, text: sent.join('') };
}

describe('StopSafeText', () => {
  it('holds back what may start a stop and sends nothing from a complete one on', () => {
    const { sent } = stream(['lo w'], [['hel', null], ['lo', null], [' w', null], ['orld', null]]);
    expect(sent.join('')).toBe('hel');
    expect(sent).toEqual(['', 'h', 'el', '']);
  });

  it('a stop that spans a special token is matched as the engine matches it', () => {
    // "<|user|>?" starts in the special token: cut where the text stands
    expect(stream(['<|user|>?'], [['abc', null], ['', '<|user|>'], ['?', null], ['more', null]]).text).toBe('abc');
    // "B?" around a special token: the engine sees B<|user|>? (no stop), so the stream must not hold B? back for good
    const around = stream(['B?'], [['B', null], ['', '<|user|>'], ['?', null], ['xy', null], ['z', null]]);
    expect(around.text).toBe('B?x');
  });
});
