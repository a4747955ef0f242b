"""The CPU decode products: one product over a whole [in, out] matrix (torch.mm) against the same
matrix in column slices multiplied by one torch.bmm (common._sliced_matmul, what CpuDecoder runs),
for the matrices of a whole SmolLM2-135M decode step (30 layers' q/k/v, o, gate/up and down, and
the output layer: 538 MB, streamed from memory as in real decoding), at 1, 4 and 16 rows.

    python bench/bench_slices.py                  # this machine's thread count
    python bench/bench_slices.py --threads 2 4 8  # several

Prints the best of three alternating timings a side and the ratio last (> 1: slices faster).
Whether slicing pays depends on the CPU (README, Benchmarks); PERSONARL_CPU_SLICES=1 turns it off.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import _column_slices, _sliced_matmul  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                    help="torch thread counts to measure; the slices per matrix follow each, as in "
                    "CpuDecoder (default: the current count)")
parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16],
                    help="rows per product (the decode batch size)")
args = parser.parse_args()


def best_time(fn, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


torch.manual_seed(0)
layer_shapes = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # [in, out]: qkv, o, gate_up, down
matrices = [torch.randn(i, o) for _ in range(30) for i, o in layer_shapes] + [torch.randn(576, 49152)]
print(f"torch {torch.__version__}, {sum(w.numel() for w in matrices) * 4 / 1e6:.0f} MB of fp32 weights")
for threads in args.threads:
    torch.set_num_threads(threads)
    sliced = [w.view(w.shape[0], _column_slices(w.shape[1], threads), -1).transpose(0, 1).contiguous()
              for w in matrices]
    for rows in args.rows:
        x = torch.randn(rows, 1536)

        def plain():
            return [torch.mm(x[:, :w.shape[0]], w) for w in matrices]

        def slices():
            return [_sliced_matmul(x[:, :w.shape[1]], w) for w in sliced]

        t_plain, t_sliced = [], []
        for _ in range(3):  # alternating, so drift hits both alike
            t_plain.append(best_time(plain))
            t_sliced.append(best_time(slices))
        a, b = min(t_plain), min(t_sliced)
        print(f"threads {threads:2d}, rows {rows:2d}: one product {a * 1e3:7.2f} ms, slices {b * 1e3:7.2f} ms: "
              f"{a / b:.2f}x")
