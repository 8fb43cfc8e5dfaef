"""One step of torch's foreach AdamW on the CPU (the reference of tests/test_optim.py's interpreted kernel
test, without Triton) against the same step in float64. Prints "off" and where when any master is more
than 1e-6 from it. Run it in many processes, as the error, where seen, came on a process's first step:
`for k in $(seq 200); do python adamw_reference.py; done | sort | uniq -c`. `--threads 1`: torch on one
thread.
"""

import argparse

import torch

parser = argparse.ArgumentParser()
parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 leaves torch's default")
if (threads := parser.parse_args().threads) > 0:
    torch.set_num_threads(threads)
decays, shapes = [0.1, 0.0, 0.1], [5000, 2049, 7]  # as in the test
torch.manual_seed(0)
masters = [torch.randn(n) for n in shapes]
params = [m.clone() for m in masters]
groups = [
    {"params": [params[0], params[2]], "weight_decay": 0.1},
    {"params": [params[1]], "weight_decay": 0.0},
]
adam = torch.optim.AdamW(groups, lr=0.01, betas=(0.9, 0.95), eps=1e-8, foreach=True)
grads = [torch.randn(n) * 3 for n in shapes]
for p, g in zip(params, grads, strict=True):
    p.grad = g / 2.0
adam.step()
report = []
for i, (start, p, g) in enumerate(zip(masters, params, grads, strict=True)):
    g64 = g.double() / 2.0  # the first step: m / sqrt(v) is g / |g| after both bias corrections
    exact = start.double() * (1 - 0.01 * decays[i]) - 0.01 * g64 / (g64.abs() + 1e-8)
    error = (p.detach().double() - exact).abs()
    if error.max() > 1e-6:
        where = (error > 1e-6).nonzero().flatten()
        worst = error.max().item()
        report.append(f"tensor {i}: {worst:.2e}, {len(where)} elements in [{where[0]}, {where[-1]}]")
print(f"threads {torch.get_num_threads()}:", "off, " + "; ".join(report) if report else "within 1e-6")
