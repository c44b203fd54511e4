/** Dense f64 linear algebra for the joint compression (row-major throughout). */
export { multiply, transpose, concatColumns, toF32, toF64 } from './dense.js';
export { householderQr, orthonormalColumns, type QrResult } from './qr.js';
export { symmetricEigen, type SymmetricEigenResult } from './symmetric-eigen.js';
export { thinSvd, type SvdResult } from './thin-svd.js';
export { solveSymmetric } from './solve-symmetric.js';
export { randomizedRangeFinder, topEigenvectorsPsd, type LinearOperator, type RangeFinderOptions, type TopEigenOptions, type TopEigenResult } from './range-finder.js';
