"""The ASER pipeline, block by block: capture -> statistics -> smooth/extract -> quantize -> reconstruct.

Block k is calibrated on the outputs of blocks 0..k-1 as already quantized (simulated with the reference
kernel), unless `propagate_quantized` is off. With the budget rank rule, blocks are simulated with the
uniform rank that spends the same budget, and the final ranks are allocated globally once every layer's
spectrum is known (one SVD per layer serves any budget; no second calibration pass). With `--rotate hadamard`
the embeddings and head are rotated before calibration and each block as it is materialized
(offline/transform/rotation.py), so calibration, GPTQ and the low-rank branch all see the rotated model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vllm_aser_offline import __version__
from vllm_aser_offline.calibrate.calibration import normalize_suffixes, read_records, render, token_windows
from vllm_aser_offline.model.device import compute_device, to_device
from vllm_aser_offline.quantize.expert_calibration import moe_report, new_stats, recalibrate_starved_experts
from vllm_aser_offline.export.export import atomic_output_dir, copy_side_files, quantized_tensors, write_config, write_shards
from vllm_aser_offline.quantize.head import head_modules, quantize_head
from vllm_aser_offline.quantize.layer_quant import QuantizedLinear, quantize_group
from vllm_aser_offline.transform.mlp_rotation import SIGN_SEED_OFFSET, mlp_hadamard_block, rotate_mlp_inner, why_not_rotatable
from vllm_aser_offline.model.model_structure import (
    InputHooks,
    UnsupportedModelError,
    capture_block_inputs,
    check_block_weights,
    run_block,
    shared_input_groups,
)
from vllm_aser_offline.options import QuantizeOptions
from vllm_aser_offline.quantize.rank_allocation import LayerSpectrum, allocate_budget
from vllm_aser_offline.model.source_model import open_source_model
from vllm_aser_offline.export.report import build_report
from vllm_aser_offline.transform.rotation import check_rotatable, head_dim, residual_rotation, rotate_block, rotate_outside
from vllm_aser_offline.evaluate.simulate import ReferenceASERLinear, set_submodule
from vllm_aser import format as fmt
from vllm_aser.kernels.reference import dequantize_weight

logger = logging.getLogger("vllm_aser_offline.pipeline")


@dataclass
class QuantizeSummary:
    output_dir: Path
    report: dict
    seconds: float
    peak_rss_mib: float


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _simulated(result: QuantizedLinear, opts: QuantizeOptions, hadamard: int = 0) -> ReferenceASERLinear:
    lowrank = result.lowrank()
    up, down = lowrank if lowrank is not None else (None, None)
    weight = dequantize_weight(result.q, result.scale, opts.group_size)
    return ReferenceASERLinear(weight, 1.0 / result.smooth, down, up, result.bias, opts.a_bits, hadamard)


def quantize_block(
    block, block_prefix, inputs, opts, hadamard: dict[str, int] | None = None
) -> tuple[list[QuantizedLinear], list[torch.Tensor], list[dict]]:
    """Quantize one decoder block; return its results, the block's outputs (the next block's inputs) and the
    experts calibrated on all tokens. `hadamard`: the block's linears whose input is rotated at run time (name in
    the block -> Hadamard block)."""
    hadamard = hadamard or {}
    groups = shared_input_groups(block, *inputs[0])
    stats = {tuple(g): new_stats(block, g) for g in groups}
    outputs = []
    with torch.no_grad():
        for hidden, kwargs in inputs:
            with InputHooks(block, groups, lambda key, x: stats[key].update(x)):
                outputs.append(run_block(block, hidden, kwargs))
        starved = recalibrate_starved_experts(block, block_prefix, stats, inputs, opts)
        results = []
        for group in groups:
            linears = {f"{block_prefix}.{n}": block.get_submodule(n) for n in group}
            results.extend(quantize_group(linears, stats[tuple(group)], opts))
        if opts.propagate_quantized:
            originals = {}
            for name, result in zip([n for g in groups for n in g], results):
                originals[name] = block.get_submodule(name)
                set_submodule(block, name, _simulated(result, opts, hadamard.get(name, 0)))
            outputs = [run_block(block, hidden, kwargs) for hidden, kwargs in inputs]
            # the simulated linears hold float32 copies of the block's weights: left in place they outlived the
            # block (release_block frees parameters only), 0.3-0.4 GiB per block of a 1.5B model
            for name, module in originals.items():
                set_submodule(block, name, module)
    return results, outputs, starved


def unquantized_tensors(
    module: torch.nn.Module, prefix: str, quantized: set[str], dtype: torch.dtype, skip_under: str | None = None
) -> dict:
    """The module's persistent tensors outside the quantized linears (and outside `skip_under`), as exported
    (floats cast to dtype)."""
    tensors = {}
    for name, tensor in module.state_dict().items():
        full = f"{prefix}.{name}" if prefix else name
        if full.rsplit(".", 1)[0] in quantized or tensor.is_meta or (skip_under and full.startswith(skip_under)):
            continue
        tensors[full] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).to("cpu", copy=True)
    return tensors


def cast_outside_stack(model: torch.nn.Module, stack_prefix: str, dtype: torch.dtype, keep: set[str] = frozenset()
                       ) -> None:
    """Embeddings, final norm and head in the export dtype once the calibration inputs are captured: nothing reads
    them again before export, which casts them to it anyway (a 1.5B model's 152k-token embedding and head are
    1.9 GiB in float32). Modules in `keep` stay as they are."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[0] in keep:
                continue
            if not name.startswith(stack_prefix + ".") and param.is_floating_point() and not param.is_meta:
                param.data = param.data.to(dtype)


def allocate_ranks(results: list[QuantizedLinear], budget_percent: float) -> None:
    """Global budget over low-rank units (a fused group with a shared down-projection, or one layer)."""
    units: dict[str, list[QuantizedLinear]] = {}
    for r in results:
        if r.spectrum is not None:
            units.setdefault(r.lowrank_unit, []).append(r)
    spectra = [
        LayerSpectrum(
            name,
            sum(m.out_features for m in members),
            members[0].in_features,
            members[0].spectrum.singular_values,
            sum(m.reference_energy for m in members),
            members[0].spectrum.max_rank,
            members[0].min_rank,
        )
        for name, members in units.items()
    ]
    # the budget is a share of all quantized weights, including layers without a low-rank branch
    weight_params = sum(r.out_features * r.in_features for r in results)
    unit_params = sum(s.out_features * s.in_features for s in spectra)
    ranks = allocate_budget(spectra, budget_percent * weight_params / max(unit_params, 1))
    for name, members in units.items():
        for m in members:
            m.rank = ranks[name]


def _mlp_rotation(opts: QuantizeOptions, residual_rotated: bool, stack) -> tuple[int, str | None]:
    """The MLP's inner Hadamard block (0: none) and, when `auto` declined it, why."""
    if opts.mlp_hadamard == "none":
        return 0, None
    if opts.mlp_hadamard == "auto" and not residual_rotated:
        return 0, "the residual stream is not rotated (auto rotates the MLP only with it)"
    if opts.mlp_hadamard == "auto" and opts.export != "aser":
        return 0, "--export compressed-tensors has no online rotation"
    if opts.mlp_hadamard == "auto" and opts.group_size != -1:
        return 0, ("group-wise weight scales (on SmolLM2 with group 128 the MLP rotation raised perplexity by 1.3-1.5%, "
                   "docs/ACCURACY.md; --mlp-hadamard 512 forces it)")
    reason = why_not_rotatable(stack.layers[0])
    if reason is not None:
        if opts.mlp_hadamard != "auto":
            raise UnsupportedModelError(f"--mlp-hadamard {opts.mlp_hadamard}: {stack.prefix}.0: {reason}; "
                                        "quantize with --mlp-hadamard none")
        logger.warning("--mlp-hadamard auto: not rotating the MLPs: %s", reason)
        return 0, reason
    width = stack.layers[0].get_submodule("mlp.down_proj").in_features
    block = mlp_hadamard_block(width, opts.mlp_hadamard)
    return block, None if block else f"the MLP width {width} is odd"


def quantize_model(
    model_dir: str | Path,
    output_dir: str | Path,
    calib: str | Path,
    opts: QuantizeOptions,
    overwrite: bool = False,
    progress: bool = True,
    calib_suffixes: tuple[str, ...] | None = None,
) -> QuantizeSummary:
    start = time.perf_counter()
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory {output_dir} exists: pass --overwrite to replace it")
    if output_dir.resolve() == model_dir.resolve():
        raise ValueError("the output directory must differ from the source model directory")
    torch.manual_seed(opts.seed)
    records = read_records(calib, calib_suffixes)  # bad calibration input fails before the model is loaded
    tokenizer, source = open_source_model(model_dir)
    texts = render(records, tokenizer)
    model, stack = source.model, source.stack
    unquantized = check_block_weights(stack.layers[0], f"{stack.prefix}.*")
    rotation, untied, rotation_refused = None, False, None
    if opts.rotate != "none":
        try:
            check_rotatable(model, stack)
        except UnsupportedModelError as exc:
            if opts.rotate == "hadamard":
                raise
            rotation_refused = str(exc)
            logger.warning("--rotate auto: not rotating this model: %s", exc)
        else:
            rotation = residual_rotation(model.get_input_embeddings().weight.shape[1], opts.seed,
                                         head_dim(stack.layers[0]))
            untied = rotate_outside(model, stack, rotation)
    mlp_block, mlp_refused = _mlp_rotation(opts, rotation is not None, stack)
    input_hadamard: dict[str, int] = {}
    samples = token_windows(texts, tokenizer, opts.num_samples, opts.seq_len, opts.seed)
    batches = list(samples.split(opts.batch_size))
    head_name = None
    keep_precision: set[str] = set()
    if opts.quantize_head:
        head_name, _, norm_name, _ = head_modules(model, stack)
        keep_precision = {head_name, norm_name}  # still computed with after the blocks
    captured = capture_block_inputs(model, stack, batches)
    dtype = getattr(torch, opts.dtype)
    cast_outside_stack(model, stack.prefix, dtype, keep_precision)
    device = compute_device(opts.device)
    hidden = [h.to(device) for h in captured.hidden]

    results: list[QuantizedLinear] = []
    starved: list[dict] = []
    tensors: dict[str, torch.Tensor] = {}  # unquantized tensors to export (block norms, embeddings, head)
    bar = tqdm(range(len(stack.layers)), desc="quantizing blocks", unit="block", disable=not progress)
    for index in bar:
        prefix = f"{stack.prefix}.{index}"
        block = source.materialize_block(index)
        if rotation is not None:
            rotate_block(block, prefix, rotation)
        block_hadamard = {}
        if mlp_block:
            gen = torch.Generator().manual_seed(opts.seed + SIGN_SEED_OFFSET + index)
            block_hadamard = rotate_mlp_inner(block, prefix, mlp_block, gen)
            input_hadamard.update({f"{prefix}.{name}": b for name, b in block_hadamard.items()})
        block.to(device)
        kwargs = [to_device(kw, device) for kw in captured.kwargs[index]]
        inputs = list(zip(hidden, kwargs))
        # tensors the quantizer creates land beside the block (the context intercepts every torch call: GPU only)
        with torch.device(device) if device.type != "cpu" else contextlib.nullcontext():
            block_results, hidden, block_starved = quantize_block(block, prefix, inputs, opts, block_hadamard)
        results.extend(r.to("cpu") for r in block_results)
        starved.extend(block_starved)
        tensors.update(unquantized_tensors(block, prefix, {r.name for r in block_results}, dtype))
        block.to("cpu")
        source.release_block(index)
        bar.set_postfix(rss=f"{peak_rss_mib():.0f}MiB")
    if head_name is not None:
        results.append(quantize_head(model, stack, hidden, opts).to("cpu"))
    del captured, hidden, inputs, kwargs

    if opts.rank_budget is not None:
        allocate_ranks(results, opts.rank_budget)

    # exported under the checkpoint's names (transformers 5 renames some on load, e.g. Mixtral's experts)
    rename = source.checkpoint_name
    for result in results:
        result.name = rename(result.name)
    tensors = {rename(name): tensor for name, tensor in tensors.items()}
    for entry in starved:
        entry["expert"] = rename(entry["expert"])
    input_hadamard = {rename(name): b for name, b in input_hadamard.items()}

    # full-precision weights (MoE routers) that vLLM may still hand to the quantization method
    routers = [rename(f"{stack.prefix}.{i}.{e['module']}") for i in range(len(stack.layers)) for e in unquantized]
    calibration = {"source": str(calib), "suffixes": list(normalize_suffixes(calib_suffixes)), "num_samples": opts.num_samples, "seq_len": opts.seq_len, "seed": opts.seed}
    # blocks were exported as they were quantized; what remains is outside the stack
    outside = unquantized_tensors(model, "", {head_name} if head_name else set(), dtype, skip_under=stack.prefix + ".")
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied:
        outside.pop("lm_head.weight", None)
    tensors.update({rename(name): tensor for name, tensor in outside.items()})
    cfg = None
    if opts.export == "compressed-tensors":
        from vllm_aser_offline.export import export_compressed as ct

        scheme, ct_format = ct.scheme_for(opts)
        for result in results:
            tensors.update(ct.compressed_tensors(result, scheme, ct_format, opts.group_size, dtype))
            result.release()
        quant_config = ct.quantization_config(scheme, ct_format, ["lm_head"])
    else:
        cfg = fmt.ASERQuantConfig(
            weight_bits=opts.w_bits,
            weight_group_size=opts.group_size,
            activation_bits=opts.a_bits,
            lowrank_dtype=opts.lowrank_dtype,
            lowrank_shared=opts.joint_lowrank,
            ignore=[*([] if head_name else ["lm_head"]), *routers],
            ranks={r.name: r.rank for r in results},
            input_hadamard=input_hadamard,
            method=opts.method,
            calibration=calibration,
            format_version=fmt.ASERQuantConfig.version_for(input_hadamard),
        )
        for result in results:
            tensors.update(quantized_tensors(result, cfg, dtype))
            result.release()
        quant_config = cfg.to_dict()

    provenance = {
        "tool": "aser-quantize",
        "tool_version": __version__,
        "source_model": str(model_dir),
        "calibration": calibration,
        "options": opts.to_dict(),
        "rank_rule": opts.rank_rule,
        "rotation": None if rotation is None else {"kind": rotation.kind, "untied_embeddings": untied},
        "rotation_refused": rotation_refused,
        "mlp_rotation": {"hadamard_block": mlp_block, "layers": len(input_hadamard)} if mlp_block else None,
        "mlp_rotation_refused": mlp_refused,
        "quantized_head": head_name,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    for entry in unquantized:
        entry["name"] = rename(entry["name"])
    report = build_report(results, provenance, unquantized, moe_report(source, starved, opts))
    seconds = time.perf_counter() - start
    report["totals"]["quantize_seconds"] = round(seconds, 2)
    report["totals"]["peak_rss_mib"] = round(peak_rss_mib(), 1)
    if device.type == "cuda":
        report["totals"]["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)

    with atomic_output_dir(output_dir, overwrite) as tmp:
        write_shards(tensors, tmp)
        copy_side_files(model_dir, tmp)
        (tmp / fmt.REPORT_FILENAME).write_text(json.dumps(report, indent=2) + "\n")
        # a quantized head is its own tensors: vLLM must not tie it to the embeddings
        untie_config = untied or (head_name is not None and tied)
        write_config(model_dir, tmp, quant_config, opts.dtype, {"tie_word_embeddings": False} if untie_config else None)
        if cfg is not None:
            fmt.validate_checkpoint(tmp, cfg)
    return QuantizeSummary(output_dir, report, time.perf_counter() - start, peak_rss_mib())
