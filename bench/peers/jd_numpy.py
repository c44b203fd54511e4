"""NumPy peer for `npm run bench -- compress`: the published JD-Full algorithm (Compress then Serve,
arXiv 2407.00066, authors' description): random orthonormal start, then 10 alternating steps, each
updating U then V by a randomized SVD (oversampling 2, 2 power iterations), in factored form.

Input directory (written by bench/compress.ts): meta.json {count, rank, inFeatures, outFeatures,
sharedRank, seed, steps}, b_all.f32 [out, count*rank] (scale folded in, each adapter normalised to
unit norm), a_all.f32 [count*rank, in]. Prints one JSON line: seconds (fit only, not file reading),
mean and max relative error per adapter.
"""
import json
import sys
import time

import numpy as np


def main(directory: str) -> None:
    with open(f"{directory}/meta.json") as f:
        meta = json.load(f)
    n, r = meta["count"], meta["rank"]
    d_in, d_out, R = meta["inFeatures"], meta["outFeatures"], meta["sharedRank"]
    b_all = np.fromfile(f"{directory}/b_all.f32", dtype=np.float32).reshape(d_out, n * r).astype(np.float64)
    a_all = np.fromfile(f"{directory}/a_all.f32", dtype=np.float32).reshape(n * r, d_in).astype(np.float64)
    best = float("inf")
    for _ in range(meta.get("repeats", 1)):
        seconds, u, v = fit(meta, b_all, a_all)
        best = min(best, seconds)
    seconds = best

    # relative error per adapter: ‖ΔW_i‖² − ‖UᵀΔW_iV‖² (U, V orthonormal), factored
    cores = np.einsum("nrs,nrt->nst", (b_all.T @ u).reshape(n, r, R), (a_all @ v).reshape(n, r, R))
    gram_b = np.einsum("onr,ons->nrs", b_all.reshape(d_out, n, r), b_all.reshape(d_out, n, r))
    gram_a = np.einsum("nri,nsi->nrs", a_all.reshape(n, r, d_in), a_all.reshape(n, r, d_in))
    norms = np.einsum("nrs,nsr->n", gram_b, gram_a)
    errors = np.sqrt(np.maximum(norms - (cores ** 2).sum(axis=(1, 2)), 0) / norms)
    print(json.dumps({"seconds": seconds, "meanError": float(errors.mean()), "maxError": float(errors.max()),
                      "numpy": np.__version__}))


def fit(meta, b_all, a_all):
    """One timed run of the published algorithm; returns (seconds, U, V)."""
    n, r = meta["count"], meta["rank"]
    d_in, d_out, R = meta["inFeatures"], meta["outFeatures"], meta["sharedRank"]
    steps = meta.get("steps", 10)
    rng = np.random.default_rng(meta["seed"])
    start = time.perf_counter()
    u, _ = np.linalg.qr(rng.standard_normal((d_out, R)))
    v, _ = np.linalg.qr(rng.standard_normal((d_in, R)))

    def left_operator(v):
        # M = [ΔW_1 V | … | ΔW_n V]: [out, n·R]; ΔW_i V = B_i (A_i V)
        p = (a_all @ v).reshape(n, r, R)
        def apply(x):  # x: [n·R, k] -> [out, k]
            k = x.shape[1]
            t = np.einsum("nrs,nsk->nrk", p, x.reshape(n, R, k)).reshape(n * r, k)
            return b_all @ t
        def apply_t(y):  # y: [out, k] -> [n·R, k]
            k = y.shape[1]
            t = (b_all.T @ y).reshape(n, r, k)
            return np.einsum("nrs,nrk->nsk", p, t).reshape(n * R, k)
        return apply, apply_t

    def right_operator(u):
        # [ΔW_1ᵀ U | … ]: [in, n·R]; ΔW_iᵀ U = A_iᵀ (B_iᵀ U)
        q = (b_all.T @ u).reshape(n, r, R)
        def apply(x):
            k = x.shape[1]
            t = np.einsum("nrs,nsk->nrk", q, x.reshape(n, R, k)).reshape(n * r, k)
            return a_all.T @ t
        def apply_t(y):
            k = y.shape[1]
            t = (a_all @ y).reshape(n, r, k)
            return np.einsum("nrs,nrk->nsk", q, t).reshape(n * R, k)
        return apply, apply_t

    def randomized_left_vectors(apply, apply_t, cols):
        omega = rng.standard_normal((cols, R + 2))
        q, _ = np.linalg.qr(apply(omega))
        for _ in range(2):
            z, _ = np.linalg.qr(apply_t(q))
            q, _ = np.linalg.qr(apply(z))
        small = apply_t(q).T  # [R+2, cols]
        ub, _, _ = np.linalg.svd(small, full_matrices=False)
        return (q @ ub)[:, :R]

    for _ in range(steps):
        u = randomized_left_vectors(*left_operator(v), n * R)
        v = randomized_left_vectors(*right_operator(u), n * R)
    return time.perf_counter() - start, u, v


if __name__ == "__main__":
    main(sys.argv[1])
