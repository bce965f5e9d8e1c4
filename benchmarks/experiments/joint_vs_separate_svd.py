"""Fused siblings (q/k/v, gate/up): one low-rank pair per projection, or one joint SVD with a shared down-projection?

At equal extra parameters, a joint SVD of the stacked whitened error [E_q; E_k; E_v] S shares the [r, in]
down-projection, so it can afford a higher rank; separate SVDs fit each projection's own error. This prints the
summed relative output error of both on real SmolLM2-135M calibration statistics (first blocks, ER, W4 per-channel).

    python benchmarks/experiments/joint_vs_separate_svd.py [--blocks 4] [--rank 16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))  # scripts, not a package

from prepare_assets import main as prepare  # noqa: E402
from vllm_aser_offline.calibrate.calibration import read_texts, token_windows  # noqa: E402
from vllm_aser_offline.model.model_structure import capture_block_inputs, run_block, shared_input_groups  # noqa: E402
from vllm_aser_offline.model.source_model import open_source_model  # noqa: E402
from vllm_aser_offline.quantize.weight_quant import quantization_error, quantize_rtn  # noqa: E402
from vllm_aser_offline.quantize.whitening import ActivationStats, damped_cholesky, output_error_energy, whitened_svd  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16, help="per-projection rank of the separate variant")
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as out:
        prepare([])
    paths = json.loads(out.getvalue())
    tokenizer, source = open_source_model(Path(paths["model"]))
    model = source.model
    samples = token_windows(read_texts(paths["calib"]), tokenizer, args.samples, 512, 0)
    stack = source.stack
    inputs = capture_block_inputs(model, stack, list(samples.split(4)))
    rows = []
    with torch.no_grad():
        for index in range(args.blocks):
            block = source.materialize_block(index)
            groups = [g for g in shared_input_groups(block, *inputs[0]) if len(g) > 1]
            stats = {tuple(g): ActivationStats(block.get_submodule(g[0]).in_features) for g in groups}
            hooks = [block.get_submodule(g[0]).register_forward_pre_hook(
                lambda _m, a, s=stats[tuple(g)]: s.update(a[0])) for g in groups]
            outputs = [run_block(block, h, kw) for h, kw in inputs]
            for h in hooks:
                h.remove()
            for group in groups:
                st = stats[tuple(group)]
                whitening = damped_cholesky(st.gram, 0.01)
                weights = [block.get_submodule(n).weight.float() for n in group]
                errors = [quantization_error(w, *quantize_rtn(w, 4, -1), -1) for w in weights]
                ref = sum(output_error_energy(w, st.gram) for w in weights)
                in_f = weights[0].shape[1]
                outs = [w.shape[0] for w in weights]
                budget = args.rank * sum(in_f + o for o in outs)
                separate = 0.0
                for e in errors:
                    up, down = whitened_svd(e, whitening, args.rank).factors(args.rank)
                    separate += output_error_energy(e - up.double() @ down.double(), st.gram)
                joint_rank = budget // (in_f + sum(outs))
                stacked = torch.cat(errors)
                up, down = whitened_svd(stacked, whitening, joint_rank).factors(joint_rank)
                joint = output_error_energy(stacked - up.double() @ down.double(), st.gram)
                base = sum(output_error_energy(e, st.gram) for e in errors)
                rows.append({
                    "block": index, "group": "+".join(n.split(".")[-1] for n in group),
                    "params": budget, "separate_rank": args.rank, "joint_rank": int(joint_rank),
                    "rel_err_rtn": round((base / ref) ** 0.5, 4),
                    "rel_err_separate": round((separate / ref) ** 0.5, 4),
                    "rel_err_joint": round((joint / ref) ** 0.5, 4),
                })
                print(json.dumps(rows[-1]), flush=True)
            inputs = [(o, kw) for o, (_, kw) in zip(outputs, inputs)]
    wins = sum(r["rel_err_joint"] < r["rel_err_separate"] for r in rows)
    print(f"joint SVD has the lower output error in {wins}/{len(rows)} fused groups at equal extra parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
