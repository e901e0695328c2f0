/**
 * Alignment padding for requests that do not start or end on the driver's
 * request alignment.
 *
 *        align         align         align         align
 *   |-------------|-------------|-------------|-------------|
 *          |<---------------- request ---------------->|
 *   |<head>|                                      |<tail>|
 *   |<-- headBlock -->|                    |<-- tailBlock -->|
 *   ^ padded.offset                                padded end ^
 *
 * `head` bytes precede the request in its first block and `tail` bytes follow
 * it in its last block. A read fills them from scratch buffers; a write reads
 * those blocks first (read-modify-write) under a serialising tracked request.
 * When the request lies inside one block, headBlock and tailBlock are the same
 * block and are read once.
 */

export interface Padding {
  /** Aligned start of the padded request. */
  offset: number;
  /** Aligned length of the padded request. */
  bytes: number;
  /** Bytes before the request in its first block. */
  head: number;
  /** Bytes after the request in its last block. */
  tail: number;
}

/** Pure arithmetic; null when the request is already aligned. */
export function computePadding(offset: number, bytes: number, align: number): Padding | null {
  const head = offset % align;
  const endRem = (offset + bytes) % align;
  const tail = endRem === 0 ? 0 : align - endRem;
  if (head === 0 && tail === 0) return null;
  return { offset: offset - head, bytes: head + bytes + tail, head, tail };
}
