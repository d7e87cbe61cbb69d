"""Merge the JSON files of several bench/musicgen.py runs (each one process, ours and transformers side by
side per model) into bench/results/musicgen-<gpu>.json.  python3 bench/merge_results.py OUT.json IN1.json IN2.json"""
import json
import sys

out, *inputs = sys.argv[1:]
runs = [json.load(open(p)) for p in inputs]
merged = {k: runs[0][k] for k in ("gpu", "torch", "transformers", "cuda", "python", "settings")}
merged["runs"] = [{"command": r["command"], "date": r["date"], "sizes": [m["size"] for m in r["models"]]} for r in runs]
merged["check"] = next((r["check"] for r in runs if r.get("check")), None)
merged["models"] = [m for r in runs for m in r["models"]]
json.dump(merged, open(out, "w"), indent=1)
print("wrote", out)
