"""NumPy peer for `npm run bench -- ops`: times the same op shapes as bench/ops.ts.

Input: argv[1] = JSON list of cases ({"op": ..., shape fields}). Output: JSON list of seconds per call
(the median of 5 rounds of >= 0.2 s each). Data is random; only the timing is compared.
"""
import json
import sys
import time

import numpy as np

rng = np.random.default_rng(0)


def rand(*shape):
    return rng.standard_normal(shape, dtype=np.float32)


def seconds_per_call(fn, rounds=5, min_seconds=0.2):
    fn()
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        calls = 0
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds and calls >= 3:
                break
        times.append(elapsed / calls)
    return sorted(times)[len(times) // 2]


def make(case):
    op = case["op"]
    if op == "rmsnorm":
        x, w = rand(case["rows"], case["dim"]), rand(case["dim"])
        out = np.empty_like(x)

        def run():
            inv = 1.0 / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + np.float32(1e-6))
            np.multiply(x * inv, w, out=out)
        return run
    if op == "softmax":
        x = rand(case["rows"], case["cols"])

        def run():
            e = np.exp(x - x.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)
        return run
    if op == "argmax":
        x = rand(case["rows"], case["cols"])

        def run():
            return x.argmax(axis=1)
        return run
    if op == "siluMul":
        g, u = rand(case["n"]), rand(case["n"])
        out = np.empty_like(g)

        def run():
            np.multiply(g / (1 + np.exp(-g)), u, out=out)
        return run
    if op == "attention":
        heads, kv, d, bs = case["heads"], case["kvHeads"], case["headDim"], case["blockSize"]
        seqs, q_len, ctx = case["seqs"], case["qLen"], case["ctxLen"]
        blocks_per_seq = -(-ctx // bs)
        k_cache = rand(seqs * blocks_per_seq, bs, kv, d)
        v_cache = rand(seqs * blocks_per_seq, bs, kv, d)
        tables = [rng.permutation(seqs * blocks_per_seq)[:blocks_per_seq] for _ in range(seqs)]
        q = rand(seqs, q_len, heads, d)
        group = heads // kv
        mask = np.triu(np.full((q_len, ctx), -np.inf, dtype=np.float32), k=ctx - q_len + 1)
        scale = np.float32(1 / np.sqrt(d))

        def run():
            for s in range(seqs):
                k = k_cache[tables[s]].reshape(-1, kv, d)[:ctx]  # gather the sequence's blocks
                v = v_cache[tables[s]].reshape(-1, kv, d)[:ctx]
                qs = q[s].reshape(q_len, kv, group, d).transpose(1, 2, 0, 3)  # [kv, group, qLen, D]
                scores = np.matmul(qs, k.transpose(1, 2, 0)[:, None]) * scale + mask  # [kv, group, qLen, ctx]
                scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
                scores /= scores.sum(axis=-1, keepdims=True)
                np.matmul(scores, v.transpose(1, 0, 2)[:, None])
        return run
    if op in ("loraShrink", "loraExpand"):
        rows, k, n, r, segs = case["rows"], case["k"], case["n"], case["rank"], case["segments"]
        per = rows // segs
        x = rand(rows, k)
        t = rand(rows, r)
        y = rand(rows, n)
        a = [rand(r, k) for _ in range(segs)]
        bt = [rand(r, n) for _ in range(segs)]  # expand factor stored [R, n], as in SOPPU
        if op == "loraShrink":
            def run():
                for s in range(segs):
                    t[s * per:(s + 1) * per] = x[s * per:(s + 1) * per] @ a[s].T
        else:
            def run():
                for s in range(segs):
                    y[s * per:(s + 1) * per] += t[s * per:(s + 1) * per] @ bt[s]
        return run
    if op == "loraApply":
        rows, k, n, r, segs = case["rows"], case["k"], case["n"], case["rank"], case["segments"]
        per = rows // segs
        x = rand(rows, k)
        y = rand(rows, n)
        a = [rand(r, k) for _ in range(segs)]
        bt = [rand(r, n) for _ in range(segs)]
        cores = rand(rows, r, r) if case["cores"] else None

        def run():
            for s in range(segs):
                t = x[s * per:(s + 1) * per] @ a[s].T  # [per, r]
                if cores is not None:
                    t = np.matmul(cores[s * per:(s + 1) * per], t[:, :, None])[:, :, 0]
                y[s * per:(s + 1) * per] += t @ bt[s]
        return run
    if op == "loraCore":
        rows, r = case["rows"], case["rank"]
        t = rand(rows, r)
        cores = rand(rows, r, r)
        out = np.empty_like(t)

        def run():
            np.matmul(cores, t[:, :, None], out=out[:, :, None])
        return run
    raise ValueError(op)


cases = json.loads(sys.argv[1])
print(json.dumps([seconds_per_call(make(c)) for c in cases]))
