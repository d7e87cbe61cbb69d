"""What one grid-wide barrier of the persistent decode step costs (lib/musicgen_persistent._grid_sync), GPU only:
one program per SM passes N barriers in a loop, nothing else; the wall time over N.
    python3 bench/grid_barrier.py [N]"""
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lib.musicgen_persistent import _grid_sync  # noqa: E402


@triton.jit
def _barriers(Bar, Err, n):
    nprog = tl.num_programs(0)
    for i in range(n):
        _grid_sync(Bar, Err, (i + 1) * nprog, 0, True)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bar = torch.zeros(2, dtype=torch.int32, device="cuda")
    for programs in (sms, sms // 2, 2 * sms):
        for warps in (4, 8):
            times = []
            for _ in range(3):
                bar.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                _barriers[(programs,)](bar[0:], bar[1:], n, num_warps=warps)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) * 1000 / n)
            print(f"programs {programs} warps {warps}: {min(times):.2f} us per barrier, error flag {int(bar[1])}",
                  flush=True)


if __name__ == "__main__":
    main()
