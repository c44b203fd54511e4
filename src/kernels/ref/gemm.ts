type Floats = Float32Array | Float64Array;

/** C = alpha·op(A)·op(B) + beta·C, row-major with leading dimensions (see KernelSet.gemmF32). */
export function gemm<T extends Floats>(transA: boolean, transB: boolean, m: number, n: number, k: number, alpha: number,
  a: T, lda: number, b: T, ldb: number, beta: number, c: T, ldc: number): void {
  for (let i = 0; i < m; i++) {
    for (let j = 0; j < n; j++) {
      let sum = 0;
      for (let p = 0; p < k; p++) {
        const aValue = transA ? a[p * lda + i]! : a[i * lda + p]!;
        const bValue = transB ? b[j * ldb + p]! : b[p * ldb + j]!;
        sum += aValue * bValue;
      }
      const index = i * ldc + j;
      c[index] = beta === 0 ? alpha * sum : alpha * sum + beta * c[index]!;
    }
  }
}
