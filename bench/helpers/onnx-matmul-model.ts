/**
 * A minimal ONNX model, Y[M,N] = X[M,K] · B[K,N] with B an initializer, encoded by hand (the ONNX
 * protobuf schema, only the fields needed), so the onnxruntime peer needs no Python or onnx package.
 */

class ProtoWriter {
  private readonly chunks: Uint8Array[] = [];

  private varint(value: number): void {
    const bytes: number[] = [];
    let v = BigInt(value);
    do {
      let byte = Number(v & 0x7fn);
      v >>= 7n;
      if (v > 0n) byte |= 0x80;
      bytes.push(byte);
    } while (v > 0n);
    this.chunks.push(Uint8Array.from(bytes));
  }

  int(field: number, value: number): this {
    this.varint((field << 3) | 0);
    this.varint(value);
    return this;
  }

  bytes(field: number, data: Uint8Array): this {
    this.varint((field << 3) | 2);
    this.varint(data.length);
    this.chunks.push(data);
    return this;
  }

  string(field: number, text: string): this {
    return this.bytes(field, new TextEncoder().encode(text));
  }

  message(field: number, inner: ProtoWriter): this {
    return this.bytes(field, inner.finish());
  }

  finish(): Uint8Array {
    const length = this.chunks.reduce((sum, c) => sum + c.length, 0);
    const out = new Uint8Array(length);
    let offset = 0;
    for (const c of this.chunks) {
      out.set(c, offset);
      offset += c.length;
    }
    return out;
  }
}

const FLOAT = 1;

function valueInfo(name: string, dims: number[]): ProtoWriter {
  const shape = new ProtoWriter();
  for (const d of dims) shape.message(1, new ProtoWriter().int(1, d)); // dim { dim_value }
  const tensorType = new ProtoWriter().int(1, FLOAT).message(2, shape); // elem_type, shape
  return new ProtoWriter().string(1, name).message(2, new ProtoWriter().message(1, tensorType)); // name, type.tensor_type
}

/** ONNX bytes of MatMul(X [m,k], B [k,n] initializer) → Y [m,n], opset 17. */
export function onnxMatmulModel(m: number, k: number, n: number, b: Float32Array): Uint8Array {
  const initializer = new ProtoWriter().int(1, k).int(1, n).int(2, FLOAT).string(8, 'B')
    .bytes(9, new Uint8Array(b.buffer, b.byteOffset, b.byteLength)); // dims, data_type, name, raw_data
  const node = new ProtoWriter().string(1, 'X').string(1, 'B').string(2, 'Y').string(3, 'matmul').string(4, 'MatMul');
  const graph = new ProtoWriter().message(1, node).string(2, 'soppu_bench').message(5, initializer)
    .message(11, valueInfo('X', [m, k])).message(12, valueInfo('Y', [m, n]));
  const opset = new ProtoWriter().string(1, '').int(2, 17);
  return new ProtoWriter().int(1, 8).message(8, opset).message(7, graph).finish(); // ir_version, opset_import, graph
}
