"""PyTorch side of `ddome bench train`.

Speaks one JSON object per line on stdin and answers one per line on stdout, like
ort_embed.py, so the Rust bench alternates runs between this process and its own. Every
answer carries "ok"; a failed request answers {"ok": false, "error": ...}.

The expert is the one ddome-models builds (models/src/nn.rs), trained as
`train_local` trains it: mean cross-entropy, SGD with momentum (dampening 0), one
optimiser step per batch.

Requests:
  {"op": "info"} -> versions and the thread count torch uses.
  {"op": "setup", "threads": T, "expert": "head" | "cnn", "classes": K,
   "embedding_dim": D, "hidden": H,                          (head)
   "channels": C, "height": H, "width": W, "cnn_width": w,   (cnn)
   "batch": B, "lr": LR, "momentum": MU,
   "params": PATH, "batch_input": PATH, "batch_labels": PATH,
   "samples": N, "data": PATH, "labels": PATH, "mean": [..], "std": [..], "seed": S}
      params: float32, every parameter in burn's order (Linear weights [in, out]).
      batch_input / batch_labels: one ready batch, float32 [B, D] or [B, C, H, W], and
      int64 [B].
      data / labels: N samples as the Rust side holds them (float32 [N, D] embeddings, or
      uint8 [N, H, W, C] pixels normalised per batch with mean and std), int64 [N].
  {"op": "step", "steps": n}   -> {"secs"}: n steps on the ready batch.
  {"op": "epoch", "steps": n}  -> {"secs"}: n steps on batches gathered from the samples
      in a shuffled order, pixels normalised per batch: what a training loop pays.
  {"op": "check", "steps": n}  -> {"losses"}: the loss before each of n steps on the ready
      batch, starting again from the given parameters.
  {"op": "quit"}
"""

import json
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class Head(nn.Module):
    def __init__(self, dim, hidden, classes):
        super().__init__()
        self.hidden = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.out(F.relu(self.hidden(x)))


class Cnn(nn.Module):
    def __init__(self, channels, width, classes):
        super().__init__()

        def conv(cin, cout, stride):
            return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)

        self.stem = conv(channels, width, 1)
        self.block1_a = conv(width, width, 1)
        self.block1_b = conv(width, width, 1)
        self.down = conv(width, 2 * width, 2)
        self.block2_a = conv(2 * width, 2 * width, 1)
        self.block2_b = conv(2 * width, 2 * width, 1)
        self.out = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.block1_b(F.relu(self.block1_a(x))))
        x = F.relu(self.down(x))
        x = F.relu(x + self.block2_b(F.relu(self.block2_a(x))))
        return self.out(x.mean(dim=(2, 3)))


def load_params(model, flat):
    """Copies burn's flat parameter vector into `model` (same module order)."""
    offset = 0
    with torch.no_grad():
        for module in model.children():
            for name in ("weight", "bias"):
                p = getattr(module, name)
                n = p.numel()
                chunk = torch.from_numpy(flat[offset : offset + n].copy())
                if isinstance(module, nn.Linear) and name == "weight":
                    # burn stores Linear weights as [in, out], torch as [out, in].
                    chunk = chunk.reshape(p.shape[1], p.shape[0]).t()
                p.copy_(chunk.reshape(p.shape))
                offset += n
    if offset != flat.size:
        raise ValueError(f"the model takes {offset} parameters, the file holds {flat.size}")


class Bench:
    def __init__(self):
        self.req = None

    def setup(self, req):
        torch.set_num_threads(int(req["threads"]))
        torch.manual_seed(int(req.get("seed", 0)))
        self.req = req
        self.batch = int(req["batch"])
        classes = int(req["classes"])
        if req["expert"] == "head":
            self.model = Head(int(req["embedding_dim"]), int(req["hidden"]), classes)
            sample_shape = (int(req["embedding_dim"]),)
        elif req["expert"] == "cnn":
            c, h, w = int(req["channels"]), int(req["height"]), int(req["width"])
            self.model = Cnn(c, int(req["cnn_width"]), classes)
            sample_shape = (c, h, w)
        else:
            raise ValueError(f"unknown expert {req['expert']!r}")
        self.params = np.fromfile(req["params"], dtype="<f4")
        load_params(self.model, self.params)
        self.x = torch.from_numpy(
            np.fromfile(req["batch_input"], dtype="<f4").reshape(self.batch, *sample_shape)
        )
        self.y = torch.from_numpy(np.fromfile(req["batch_labels"], dtype="<i8"))
        n = int(req["samples"])
        self.labels = torch.from_numpy(np.fromfile(req["labels"], dtype="<i8"))
        if req["expert"] == "head":
            self.data = torch.from_numpy(
                np.fromfile(req["data"], dtype="<f4").reshape(n, *sample_shape)
            )
            self.normalise = None
        else:
            self.data = torch.from_numpy(np.fromfile(req["data"], dtype=np.uint8).reshape(n, h, w, c))
            mean = torch.tensor(req["mean"][:c], dtype=torch.float32)
            std = torch.tensor(req["std"][:c], dtype=torch.float32)
            # HWC bytes -> normalised CHW floats, as ddome's Features::batch does.
            self.normalise = lambda u8: ((u8.float() - mean) / std).permute(0, 3, 1, 2).contiguous()
        self.generator = torch.Generator().manual_seed(int(req.get("seed", 0)))
        self.order = torch.randperm(n, generator=self.generator)
        self.cursor = 0
        self.optimiser()
        # Warm-up: the first steps allocate and pick kernels.
        self.step(self.x, self.y)
        self.step(self.x, self.y)
        return {"threads": torch.get_num_threads(), "parameters": int(self.params.size)}

    def optimiser(self):
        self.opt = torch.optim.SGD(
            self.model.parameters(),
            lr=float(self.req["lr"]),
            momentum=float(self.req["momentum"]),
            dampening=0.0,
        )

    def step(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        return loss

    def steps(self, req):
        n = int(req["steps"])
        started = time.perf_counter()
        for _ in range(n):
            self.step(self.x, self.y)
        return {"secs": time.perf_counter() - started}

    def next_indices(self):
        if self.cursor + self.batch > self.order.numel():
            self.order = torch.randperm(self.order.numel(), generator=self.generator)
            self.cursor = 0
        idx = self.order[self.cursor : self.cursor + self.batch]
        self.cursor += self.batch
        return idx

    def epoch(self, req):
        n = int(req["steps"])
        started = time.perf_counter()
        for _ in range(n):
            idx = self.next_indices()
            x = self.data[idx]
            if self.normalise is not None:
                x = self.normalise(x)
            loss = self.step(x, self.labels[idx])
            # train_local reads every batch's loss to catch divergence.
            if not np.isfinite(loss.item()):
                raise ValueError("training diverged")
        return {"secs": time.perf_counter() - started}

    def check(self, req):
        load_params(self.model, self.params)
        self.optimiser()
        losses = [float(self.step(self.x, self.y).item()) for _ in range(int(req["steps"]))]
        return {"losses": losses}


def info():
    return {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
    }


def main():
    bench = Bench()
    handlers = {
        "info": lambda r: info(),
        "setup": bench.setup,
        "step": bench.steps,
        "epoch": bench.epoch,
        "check": bench.check,
    }
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
            if req.get("op") == "quit":
                break
            if req.get("op") not in handlers:
                raise ValueError(f"unknown op {req.get('op')!r}")
            reply = {"ok": True, **handlers[req["op"]](req)}
        except Exception as err:  # the bench reports it and decides
            reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
