"""DeiT-S's train step (forward alone; forward + backward) on CPU, fp32, in this interpreter's timm, for the
variants given: plain (timm's model), toe (patched by toe.patch, stage 0: the op's identity stage), and
plain-nofused (timm's attention without fused SDPA). Run it under two environments (e.g. timm 1.0 and timm 0.9.2,
the official ToE code's) and compare the medians. Usage: python scripts/step-parity.py BATCH plain,toe[,...]
Prints one JSON line: median seconds per variant."""

import json
import statistics
import sys
import time

import timm
import torch

torch.manual_seed(0)
B = int(sys.argv[1])
variants = sys.argv[2].split(",")
torch.set_num_threads(2)
x = torch.randn(B, 3, 224, 224)
y = torch.randint(0, 1000, (B,))
out = {"timm": timm.__version__}


def make(variant):
    m = timm.create_model("deit_small_patch16_224", drop_path_rate=0.1, num_classes=1000)
    if "nofused" in variant:
        for b in m.blocks:
            b.attn.fused_attn = False
    if "toe" in variant:
        import toe

        sched = toe.ExpansionSchedule([5, 100, 200], [0.5, 0.75, 1.0], 0.25, repeats=2)
        toe.patch(m, sched)
        toe.set_epoch(m, 0)
    m.train()
    return m


models = {v: make(v) for v in variants}
opt = {v: torch.optim.AdamW(models[v].parameters(), lr=1e-4) for v in variants}
loss_fn = torch.nn.CrossEntropyLoss()


def fwd(v):
    with torch.no_grad():
        models[v](x)


def step(v):
    loss = loss_fn(models[v](x), y)
    loss.backward()
    opt[v].zero_grad(set_to_none=True)


for v in variants:
    fwd(v)
    step(v)
res = {v: {"fwd": [], "step": []} for v in variants}
for _ in range(4):  # rounds, the variants alternated in each
    for v in variants:
        t = time.perf_counter()
        fwd(v)
        res[v]["fwd"].append(time.perf_counter() - t)
        t = time.perf_counter()
        step(v)
        res[v]["step"].append(time.perf_counter() - t)
for v in variants:
    out[v] = {k: statistics.median(a) for k, a in res[v].items()}
    out[v]["fused"] = models[v].blocks[0].attn.fused_attn
print(json.dumps(out))
