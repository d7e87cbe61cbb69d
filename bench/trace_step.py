"""Where a decode step's time goes, launch by launch (GPU only, diagnostic): every GEMV and self-attention program of
the fused step stores the global timer at its start, once past its wait and at its end (lib.musicgen_fast.StepTrace),
and this prints, for the last step of a batch-1 clip (CFG 3, top_k 250, fp16, random-init full-size model):
- per launch: programs, how many started only after the launch before it had ended (a second wave, whose weights
  were not asked for before the wait), `release` (first program past its wait, after the launch before it ended),
  `after` (its last program's end, after its first program passed the wait), `tail` (its last program's end after
  its median program's end), and its weights' rate over `after`;
- the same averaged over the layers, per kind of launch.
    python3 bench/trace_step.py small,medium [seconds]
Writes trace-step.json and .log to $OUT (or here)."""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from musicgen import build, clip_wall  # noqa: E402
import lib.musicgen_fast as mf  # noqa: E402


def summarize(trace: mf.StepTrace, weights: dict) -> list:
    """Per traced launch of the last step: times in us from the first launch's first start (see the module doc)."""
    buf = trace.buf.cpu()
    stamps = [buf[off:off + 3 * n].view(n, 3).double() for _, off, n in trace.launches]
    t0 = min(s[:, 0].min().item() for s in stamps)
    rows, prev_end = [], None
    for (name, _, n), s in zip(trace.launches, stamps):
        s = (s - t0) / 1000.0
        start, wait, end = s[:, 0], s[:, 1], s[:, 2]
        row = dict(name=name, programs=n, first_start=start.min().item(), first_wait=wait.min().item(),
                   last_wait=wait.max().item(), median_end=end.median().item(), last_end=end.max().item())
        row["after"] = row["last_end"] - row["first_wait"]
        row["tail"] = row["last_end"] - row["median_end"]
        if prev_end is not None:
            row["release"] = row["first_wait"] - prev_end
            row["second_wave"] = int((start > prev_end).sum().item())
        nbytes = weights.get(name.split(" ")[1]) if name.startswith("gemv") else None
        if nbytes:
            row["tb_s"] = nbytes / (row["after"] * 1e-6) / 1e12
        rows.append(row)
        prev_end = row["last_end"]
    return rows


def main():
    sizes = (sys.argv[1] if len(sys.argv) > 1 else "small,medium").split(",")
    secs = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    out_dir = Path(os.environ.get("OUT", "."))
    lines, results = [], {}

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    log(f"# {torch.cuda.get_device_name()} torch {torch.__version__} cuda {torch.version.cuda}")
    log(f"# python3 bench/trace_step.py {' '.join(sys.argv[1:])}")
    for size in sizes:
        model = build(size)
        mf.STEP_TRACE = None
        _, plain = clip_wall(mf.FastMusicgen(model, "cuda", torch.float16), secs, runs=1)
        mf.STEP_TRACE = mf.StepTrace("cuda")
        fast = mf.FastMusicgen(model, "cuda", torch.float16)
        _, traced = clip_wall(fast, secs, runs=1)
        trace, mf.STEP_TRACE = mf.STEP_TRACE, None
        steps = secs * 50 + 3
        weights = {f"{w.shape[0]}x{w.shape[1]}": w.numel() * w.element_size()
                   for lay in fast.layers for w in (lay.wqkv, lay.wo, lay.fc1, lay.fc2) if w is not None}
        weights[f"{fast.heads.shape[0]}x{fast.heads.shape[1]}"] = fast.heads.numel() * fast.heads.element_size()
        rows = summarize(trace, weights)
        span = rows[-1]["last_end"] - rows[0]["first_wait"]
        log(f"\n## {size}, {secs} s clip: {plain * 1000 / steps:.3f} ms per step untraced, "
            f"{traced * 1000 / steps:.3f} traced; the last step's traced launches span {span:.1f} us "
            f"({len(rows)} launches)")
        per_layer = (len(rows) - 1) // len(fast.layers)
        mid = len(fast.layers) // 2
        log(f"### layer {mid}'s launches (us)")
        log(f"{'launch':34s} {'progs':>5s} {'2nd':>4s} {'release':>7s} {'after':>6s} {'tail':>5s} {'TB/s':>5s}")
        for r in rows[mid * per_layer:(mid + 1) * per_layer]:
            log(f"{r['name']:34s} {r['programs']:5d} {r.get('second_wave', 0):4d} {r.get('release', 0):7.2f} "
                f"{r['after']:6.2f} {r['tail']:5.2f} {r.get('tb_s', 0):5.2f}")
        log("### every layer, per kind of launch: mean us (the launches of one layer are consecutive)")
        kinds = {}
        for j, r in enumerate(rows[:-1]):
            kinds.setdefault((j % per_layer, r["name"]), []).append(r)
        total_release = total_after = 0.0
        for (_, name), rs in sorted(kinds.items()):
            rel = sum(r.get("release", 0) for r in rs) / len(rs)
            aft = sum(r["after"] for r in rs) / len(rs)
            total_release += rel * len(rs)
            total_after += aft * len(rs)
            tb = [r["tb_s"] for r in rs if "tb_s" in r]
            log(f"{name:34s} release {rel:5.2f} after {aft:6.2f} tail {sum(r['tail'] for r in rs) / len(rs):5.2f} "
                f"2nd wave {sum(r.get('second_wave', 0) for r in rs) / len(rs):6.1f}"
                + (f" {sum(tb) / len(tb):5.2f} TB/s" if tb else ""))
        log(f"sum over the step: release {total_release:.1f} us, after {total_after:.1f} us, of a {span:.1f} us span")
        results[size] = dict(secs=secs, ms_per_step=plain * 1000 / steps, ms_per_step_traced=traced * 1000 / steps,
                             span_us=span, launches=rows)
        del fast, model
        torch.cuda.empty_cache()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "trace-step.json").write_text(json.dumps(results, indent=1))
    (out_dir / "trace-step.log").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
