/**
 * Stop-sequence matching on the generated text with special tokens' text kept, as LoRAX/TGI match stops
 * ("<|im_end|>", "<|im_end|>\n" and "</s><s>" stop where those tokens are not eos ids), while the generated
 * text itself leaves special tokens out. The window holds the last characters of that text (at least the
 * longest stop's length − 1) as chunks, so a match is mapped back to a cut in the generated text.
 */
export class StopWindow {
  private readonly stops: readonly string[];
  private readonly keep: number;
  private chunks: { text: string; special: boolean; token: number }[] = [];
  private length = 0;
  private pushes = 0;
  /** Once a stop matched: the index (in push order) of the token it starts in; tokens from it on belong to it. */
  stopToken: number | null = null;
  /** The generated text's length where the window starts (its special tokens' text not counted). */
  private textStart = 0;

  /** `stops`: non-empty strings. */
  constructor(stops: readonly string[]) {
    this.stops = stops;
    this.keep = Math.max(0, ...stops.map((stop) => stop.length - 1));
  }

  /**
   * Appends one token: `piece`, the text it adds to the generated text, and `specialText`, a special token's
   * own text (null for other tokens). Returns where the generated text is cut when a stop now ends in the
   * window (at the stop's start; a stop starting inside a special token's text cuts where that token stands),
   * else null.
   */
  push(piece: string, specialText: string | null): number | null {
    return this.append(piece, specialText, this.pushes++);
  }

  /**
   * Appends text the detokenizer held back until the end (the last tokens' unfinished character, flushed):
   * it belongs to the last token pushed. Returns a cut as push does.
   */
  pushTail(text: string): number | null {
    return this.append(text, null, Math.max(0, this.pushes - 1));
  }

  private append(piece: string, specialText: string | null, token: number): number | null {
    const before = this.length;
    if (piece.length > 0) this.add(piece, false, token);
    if (specialText !== null && specialText.length > 0) this.add(specialText, true, token);
    if (this.length === before) return null;
    const joined = this.chunks.map((chunk) => chunk.text).join('');
    let at = -1;
    for (const stop of this.stops) {
      const found = joined.indexOf(stop, Math.max(0, before - stop.length + 1));
      if (found >= 0 && (at < 0 || found < at)) at = found;
    }
    if (at >= 0) {
      const { token: startToken, textIndex } = this.locate(at);
      this.stopToken = startToken;
      return textIndex;
    }
    // drop whole chunks while the rest still holds `keep` characters
    while (this.chunks.length > 0 && this.length - this.chunks[0]!.text.length >= this.keep) {
      const dropped = this.chunks.shift()!;
      this.length -= dropped.text.length;
      if (!dropped.special) this.textStart += dropped.text.length;
    }
    return null;
  }

  private add(text: string, special: boolean, token: number): void {
    this.chunks.push({ text, special, token });
    this.length += text.length;
  }

  /**
   * Window position `at`: the token whose chunk holds it, and the generated text's index there (a position inside
   * a special token's text is where that token stands).
   */
  private locate(at: number): { token: number; textIndex: number } {
    let textIndex = this.textStart;
    let position = 0;
    for (const chunk of this.chunks) {
      if (position + chunk.text.length > at) return { token: chunk.token, textIndex: chunk.special ? textIndex : textIndex + (at - position) };
      if (!chunk.special) textIndex += chunk.text.length;
      position += chunk.text.length;
    }
    return { token: this.pushes - 1, textIndex };
  }
}
