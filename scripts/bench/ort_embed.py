"""onnxruntime side of `ddome bench embed`.

Speaks one JSON object per line on stdin and answers one per line on stdout, so the Rust
bench can keep a warm session here and alternate runs with tract in its own process. Every
answer carries "ok"; a failed request answers {"ok": false, "error": ...} and the server
keeps going.

Requests:
  {"op": "info"}
      -> versions and the CPU count onnxruntime sees.
  {"op": "load", "model": PATH, "input": PATH, "batch": B, "side": S, "threads": T,
   "mode": "intra" | "data-parallel"}
      Loads the ONNX file and the input tensor, raw little-endian float32 [B, 3, S, S]
      written by the Rust side (the very tensor tract gets).
      "intra": one session with intra_op_num_threads = T, runs one batch of B at a time.
      "data-parallel": T sessions with one thread each, each running its own batch of B at
      the same time, the way the Rust library's workers do.
  {"op": "run", "iters": N}
      -> {"secs": wall seconds, "images": images embedded}. One iteration embeds B * T
      images in either mode, so both modes do the same work per iteration.
  {"op": "output", "path": PATH}
      Writes the embedding of the loaded batch, float32 [B, 1280], for comparison.
  {"op": "quit"}
"""

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort

OUTPUT = "embedding"
INPUT = "input"


def session(model, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class Bench:
    def __init__(self):
        self.sessions = []
        self.pool = None
        self.input = None
        self.mode = None
        self.threads = 1

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()
        self.pool = None
        self.sessions = []

    def load(self, req):
        self.close()
        batch, side, threads = int(req["batch"]), int(req["side"]), int(req["threads"])
        mode = req["mode"]
        data = np.fromfile(req["input"], dtype="<f4")
        expected = batch * 3 * side * side
        if data.size != expected:
            raise ValueError(f"{req['input']} holds {data.size} floats, expected {expected}")
        self.input = np.ascontiguousarray(data.reshape(batch, 3, side, side))
        started = time.perf_counter()
        if mode == "intra":
            self.sessions = [session(req["model"], threads)]
        elif mode == "data-parallel":
            self.sessions = [session(req["model"], 1) for _ in range(threads)]
            # onnxruntime releases the GIL inside run(), so Python threads run sessions in
            # parallel.
            self.pool = ThreadPoolExecutor(max_workers=threads)
        else:
            raise ValueError(f"unknown mode {mode!r}")
        self.mode, self.threads = mode, threads
        load_secs = time.perf_counter() - started
        # The first run allocates and tunes; keep it out of every timing.
        self.iteration()
        return {"load_secs": load_secs}

    def one(self, sess):
        return sess.run([OUTPUT], {INPUT: self.input})[0]

    def iteration(self):
        if self.mode == "intra":
            for _ in range(self.threads):
                self.one(self.sessions[0])
        else:
            list(self.pool.map(self.one, self.sessions))

    def run(self, req):
        iters = int(req["iters"])
        if not self.sessions:
            raise ValueError("run before load")
        started = time.perf_counter()
        for _ in range(iters):
            self.iteration()
        secs = time.perf_counter() - started
        return {"secs": secs, "images": iters * self.threads * self.input.shape[0]}

    def output(self, req):
        out = np.ascontiguousarray(self.one(self.sessions[0]), dtype="<f4")
        out.tofile(req["path"])
        return {"shape": list(out.shape)}


def info():
    return {
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }


def main():
    bench = Bench()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "quit":
                break
            handlers = {
                "info": lambda r: info(),
                "load": bench.load,
                "run": bench.run,
                "output": bench.output,
            }
            if op not in handlers:
                raise ValueError(f"unknown op {op!r}")
            reply = {"ok": True, **handlers[op](req)}
        except Exception as err:  # the bench reports it and decides
            reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    bench.close()


if __name__ == "__main__":
    main()
