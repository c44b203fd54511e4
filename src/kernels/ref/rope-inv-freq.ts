/**
 * The rope_scaling block of config.json: Llama-3 style (wavelength bands), or linear (position
 * interpolation: every frequency divided by `factor`).
 */
export type RopeScaling =
  | {
      readonly ropeType: 'llama3';
      readonly factor: number;
      readonly lowFreqFactor: number;
      readonly highFreqFactor: number;
      readonly originalMaxPositionEmbeddings: number;
    }
  | { readonly ropeType: 'linear'; readonly factor: number };

/**
 * invFreq[i] = theta^(−2i/D), i < D/2, scaled when given: linear divides every frequency by `factor`;
 * Llama-3 divides long wavelengths by `factor`, keeps short ones, and interpolates the band between
 * smoothly (as in HF transformers).
 */
export function ropeInvFreq(headDim: number, theta: number, scaling?: RopeScaling | null): Float32Array {
  const half = headDim / 2;
  const invFreq = new Float32Array(half);
  for (let i = 0; i < half; i++) {
    let frequency = 1 / theta ** ((2 * i) / headDim);
    if (scaling?.ropeType === 'linear') {
      frequency /= scaling.factor; // positions divided by the factor, as transformers' linear scaling
    } else if (scaling) {
      const lowFreqWavelength = scaling.originalMaxPositionEmbeddings / scaling.lowFreqFactor;
      const highFreqWavelength = scaling.originalMaxPositionEmbeddings / scaling.highFreqFactor;
      const wavelength = (2 * Math.PI) / frequency;
      if (wavelength > lowFreqWavelength) frequency /= scaling.factor;
      else if (wavelength >= highFreqWavelength) {
        const smooth = (scaling.originalMaxPositionEmbeddings / wavelength - scaling.lowFreqFactor) / (scaling.highFreqFactor - scaling.lowFreqFactor);
        frequency = (1 - smooth) * (frequency / scaling.factor) + smooth * frequency;
      }
    }
    invFreq[i] = frequency;
  }
  return invFreq;
}
