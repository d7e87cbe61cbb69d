"""The Triton kernels that run on CUDA, checked on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set
before Triton is imported, hence a subprocess per case): on tiny random weights they must give what transformers /
torch give.
- the fused decode step (the GPU's path for one request: GEMVs with their layer norms, split self-attention, the
  folded cross-attention with its scores GEMV before the layer norm, sampling), token and logit parity with
  transformers' generate, as test_musicgen_fast does for the eager path: mono and stereo (8 codebooks);
- the persistent step (lib/musicgen_persistent.py, off by default), the same for melody, with chunks small enough that
  every program reads several;
- EnCodec's LSTM as one launch per layer (lib/lstm.py) against torch.nn.LSTM."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parent.parent


def run_case(*args):
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch,persistent", [("mono", False), ("stereo", False), ("melody", True)])
def test_decode_step_kernels_match_transformers(arch, persistent):
    res = run_case("step", arch, str(int(persistent)))
    assert res["persistent_used"] == persistent
    # the scores GEMV before the norm (fold_r)
    assert res["cross_ln_fold_used"] == (arch != "melody" and not persistent)
    assert res["steps"] == res["ref_steps"] > 0
    assert res["max_logit_err"] < 2e-4, res
    assert res["codes_equal"], res


def test_lstm_kernel_matches_torch():
    res = run_case("lstm")
    for case in res:
        assert case["max_err"] < 1e-5, case


def _step_case(arch, persistent):
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    import lib.musicgen_fast as mf
    import lib.musicgen_persistent as mp
    from test_musicgen_fast import make_request, model_for, run_reference

    model = model_for(arch)
    torch.manual_seed(5)
    for mod in model.decoder.modules():  # random norm weights and biases (built as 1 and 0), so that folding them
        if isinstance(mod, torch.nn.LayerNorm):  # into a GEMV (the cross-attention's scores) is checked
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_(0.0, 0.2)
    req = make_request(model, arch, new_frames=5, batch=1)  # one request: the fold and the persistent step apply
    with pytest.MonkeyPatch.context() as monkeypatch:
        ref_codes, ref_logits = run_reference(model, req, 7, monkeypatch)
    mf.PERSISTENT_STEP = persistent
    mp.CHUNK_ELEMS = 256  # several chunks per program on the tiny widths
    fast = mf.FastMusicgen(model, device="cpu", dtype=torch.float32, attn="triton", fused_step=True)
    logits = []
    fast.on_logits = lambda lg: logits.append(lg.float().reshape(-1, fast.V).clone())
    codes = fast.generate_codes(req, torch.Generator().manual_seed(7))
    while len(ref_logits) > len(logits) and torch.equal(ref_logits[0], ref_logits[1]):
        ref_logits.pop(0)  # transformers 5.2x runs the prefill twice (test_musicgen_fast.assert_parity)
    slot = next(iter(fast._slots.values()))
    return dict(persistent_used=fast.persistent is not None and fast.persistent.applies(fast, slot),
                cross_ln_fold_used=slot.fold_r is not None and not fast.persistent,
                steps=len(logits), ref_steps=len(ref_logits),
                max_logit_err=max((a - b).abs().max().item() for a, b in zip(logits, ref_logits)),
                codes_equal=bool(torch.equal(codes, ref_codes)))


def _lstm_case():
    import torch

    from lib.lstm import applies, lstm_layers

    torch.manual_seed(0)
    out = []
    for C, B, T in ((64, 1, 9), (48, 3, 5)):  # a power-of-two width and one that is not, several batch rows
        lstm = torch.nn.LSTM(C, C, 2)
        x = torch.randn(T, B, C)
        with torch.no_grad():
            ok = applies(lstm, x)
            err = (lstm_layers(lstm, x) - lstm(x)[0]).abs().max().item()
        out.append(dict(C=C, B=B, T=T, applies=ok, max_err=err))
    return out


if __name__ == "__main__":
    case = sys.argv[1]
    result = _step_case(sys.argv[2], sys.argv[3] == "1") if case == "step" else _lstm_case()
    print(json.dumps(result))
