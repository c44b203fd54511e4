/**
 * The byte-level alphabet of GPT-2-style tokenizers (tokenizer.json's ByteLevel pre-tokenizer and
 * decoder): every byte is written as one printable character in vocabulary entries.
 */

/** GPT-2's byte → printable character map (the ByteLevel pre-tokenizer's alphabet). */
export function bytesToUnicode(): string[] {
  const printable: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) printable.push(b);
  for (let b = 0xa1; b <= 0xac; b++) printable.push(b);
  for (let b = 0xae; b <= 0xff; b++) printable.push(b);
  const map: string[] = new Array<string>(256);
  let extra = 0;
  for (let b = 0; b < 256; b++) {
    if (printable.includes(b)) map[b] = String.fromCodePoint(b);
    else map[b] = String.fromCodePoint(256 + extra++);
  }
  return map;
}

/** The inverse table: a vocabulary entry's character → the byte it stands for. */
export const BYTE_OF_CHAR: ReadonlyMap<string, number> = new Map(bytesToUnicode().map((ch, byte) => [ch, byte]));
