/**
 * Canonical module paths: "model.layers.3.self_attn.q_proj", "transformer.h.0.attn.c_attn".
 */

/** Layer index: the first all-digit component of the path, or -1 when there is none. */
export function layerOfPath(path: string): number {
  for (const part of path.split('.')) {
    if (/^\d+$/.test(part)) return Number(part);
  }
  return -1;
}

/** Last path component: "q_proj", "c_attn", … */
export function moduleNameOfPath(path: string): string {
  const dot = path.lastIndexOf('.');
  return dot < 0 ? path : path.slice(dot + 1);
}

/** Orders paths by layer, then by name, so "layers.2" precedes "layers.10". */
export function compareModulePaths(x: string, y: string): number {
  return layerOfPath(x) - layerOfPath(y) || (x < y ? -1 : x > y ? 1 : 0);
}
