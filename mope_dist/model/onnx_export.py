"""ONNX export of each tower of a PrunableCLIP, checked against onnxruntime.

A compressed CLIP is served as two encoders apart (images behind a retrieval index, captions in a search
service), often where there is no PyTorch; a pruned model's per-layer widths fit no open_clip class, so
ONNX is its portable form. Each tower becomes one graph with a dynamic batch axis (torch.onnx's
torch.export-based exporter), export.json tells a client in any language how to feed it, and every
export is compared with the PyTorch model on onnxruntime in a temp dir that replaces the output only
when the comparison passes.

Needs the `export` extra (onnx, onnxruntime, and onnxscript for torch's exporter); nothing in training
imports this module.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import torch
from open_clip.model import resize_pos_embed
from torch import Tensor, nn

from ..errors import JobError
from ..utils import atomic_dir
from .clip import PrunableCLIP, Tower, build_on_meta
from .io import get_tokenizer, preprocess_cfg, transforms
from .spec import VisionSpec

IMAGE_FILE, TEXT_FILE, META_FILE = "image_encoder.onnx", "text_encoder.onnx", "export.json"
IMAGE_INPUT, TEXT_INPUT = "pixel_values", "input_ids"
IMAGE_OUTPUT, TEXT_OUTPUT = "image_embeds", "text_embeds"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
DEFAULT_OPSET = 18  # the exporter's own opset (no version conversion); onnxruntime >= 1.14 runs it
# (metric, bound) each export must meet against the fp32 PyTorch model. fp16 keeps ~3 significant
# digits per operation, so its bound is relative: |onnx - torch| / |torch| per embedding (L2 norms).
PARITY = {"fp32": ("max_abs_diff", 1e-4), "fp16": ("max_rel_diff", 1e-2)}
EXTERNAL_DATA_BYTES = 1 << 30  # bigger towers keep weights in FILE.data (protobuf stops at 2 GiB)
EXAMPLE_BATCH = 2  # torch.export would specialise a batch of 1; checks use other sizes on purpose


class TowerEncoder(nn.Module):
    """One tower as a deployable function: float32 pixels or int64 token ids in, raw (not normalised)
    float32 embeddings out, computed in the tower's own dtype; equal to encode_image / encode_text."""

    def __init__(self, tower: Tower):
        super().__init__()
        self.tower = tower
        self.dtype = next(tower.parameters()).dtype

    def forward(self, inputs: Tensor) -> Tensor:
        if inputs.is_floating_point():
            inputs = inputs.to(self.dtype)
        return self.tower(inputs).float()


def with_image_size(model: PrunableCLIP, size: list[int]) -> PrunableCLIP:
    """The model for [H, W] inputs: its positional-embedding grid resized the way open_clip does when an
    image size is forced (open_clip.model.resize_pos_embed: bicubic, class token kept)."""
    size = [int(s) for s in size]
    if size == list(model.spec.vision.image_size):
        return model
    check_image_size(model.spec.vision, size)
    ph, pw = model.spec.vision.patch_size
    spec = copy.deepcopy(model.spec)
    spec.vision.image_size = size
    spec.preprocess = {**spec.preprocess, "size": size}
    state = dict(model.state_dict())
    resize_pos_embed(state, SimpleNamespace(visual=SimpleNamespace(grid_size=(size[0] // ph, size[1] // pw))))
    resized = build_on_meta(spec)
    resized.load_state_dict(state, strict=True, assign=True)
    return resized.eval()


def check_image_size(vision: VisionSpec, size: list[int]) -> None:
    """ValueError unless with_image_size can serve [H, W] images with this vision tower."""
    (h, w), (ph, pw) = vision.image_size, vision.patch_size
    if len(size) != 2 or min(size) <= 0 or size[0] % ph or size[1] % pw:
        raise ValueError(f"image size {size} is not a positive multiple of the patch size {ph}x{pw}")
    if h // ph != w // pw and list(size) != [h, w]:  # open_clip's resize_pos_embed assumes a square grid
        raise ValueError(f"the positional embedding's {h // ph}x{w // pw} patch grid is not square")


def random_token_ids(model: PrunableCLIP, n: int, generator: torch.Generator) -> Tensor:
    """Token ids shaped like the tokenizer's: SOT, random words, EOT, zero padding, random lengths."""
    tok, ctx = get_tokenizer(model), model.spec.text.context_length
    hi = min(model.spec.text.vocab_size, tok.sot_token_id)
    ids = torch.zeros(n, ctx, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(2, ctx + 1, (1,), generator=generator))
        ids[i, 0], ids[i, length - 1] = tok.sot_token_id, tok.eot_token_id
        ids[i, 1 : length - 1] = torch.randint(1, hi, (length - 2,), generator=generator)
    return ids


def random_cases(model: PrunableCLIP, seed: int = 0) -> dict[str, list[tuple[str, Tensor]]]:
    """Random pixels and token ids at batch sizes 1 and 3 (not the export's example batch)."""
    g = torch.Generator().manual_seed(seed)
    h, w = model.spec.vision.image_size
    return {
        "image": [(f"random x{n}", torch.randn(n, 3, h, w, generator=g)) for n in (1, 3)],
        "text": [(f"random x{n}", random_token_ids(model, n, g)) for n in (1, 3)],
    }


def sample_cases(
    model: PrunableCLIP, images: list, captions: list[str]
) -> dict[str, list[tuple[str, Tensor]]]:
    """PIL images through the model's eval preprocess and captions through its tokenizer."""
    preprocess = transforms(model)[1]
    return {
        "image": [(f"{len(images)} images via the preprocess", torch.stack([preprocess(i) for i in images]))],
        "text": [(f"{len(captions)} captions via the tokenizer", get_tokenizer(model)(captions))],
    }


def ort_session(path: str | os.PathLike, threads: int | None = None) -> ort.InferenceSession:
    """A CPU onnxruntime session; `threads` intra-op threads (None: onnxruntime's default)."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_parity(
    reference: PrunableCLIP,
    export_dir: str | os.PathLike,
    dtype: str,
    cases: dict[str, list[tuple[str, Tensor]]],
) -> dict:
    """Run every case through both onnxruntime graphs and the fp32 PyTorch model; JobError past PARITY."""
    metric, bound = PARITY[dtype]
    report = {"reference": "PyTorch float32", "criterion": f"{metric} <= {bound:g}"}
    encoders = (("image", IMAGE_FILE, reference.encode_image), ("text", TEXT_FILE, reference.encode_text))
    for tower, file, encode in encoders:
        session = ort_session(Path(export_dir) / file)
        name = session.get_inputs()[0].name
        rows = []
        for label, x in cases[tower]:
            with torch.no_grad():
                want = encode(x).double().numpy()
            diff = session.run(None, {name: x.numpy()})[0].astype(np.float64) - want
            rel = np.linalg.norm(diff, axis=1) / np.maximum(np.linalg.norm(want, axis=1), 1e-30)
            rows.append(
                {"inputs": label, "max_abs_diff": float(np.abs(diff).max()), "max_rel_diff": float(rel.max())}
            )
            if not rows[-1][metric] <= bound:  # also catches NaN
                raise JobError(
                    f"onnxruntime's {tower} encoder ({dtype}) disagrees with PyTorch on {label}: "
                    f"{metric} {rows[-1][metric]:.3g} > {bound:g}"
                )
        report[tower] = rows
    return report


def export_onnx(
    model: PrunableCLIP,
    out: str | os.PathLike,
    *,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    cases: dict[str, list[tuple[str, Tensor]]] | None = None,
    provenance: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Write OUT/{image_encoder,text_encoder}.onnx and export.json (returned). Random inputs and `cases`
    are checked against the fp32 model (check_parity) before OUT is replaced; the model is not changed."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    reference = copy.deepcopy(model).to("cpu", torch.float32).eval()  # exported and checked on the CPU
    deployed = reference if dtype == "fp32" else copy.deepcopy(reference).to(DTYPES[dtype])
    checks = random_cases(reference)
    for tower, extra in (cases or {}).items():
        checks[tower] = checks[tower] + list(extra)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(EXAMPLE_BATCH, 3, *reference.visual.image_size, generator=g)
    towers = (
        (IMAGE_FILE, deployed.visual, IMAGE_INPUT, IMAGE_OUTPUT, images),
        (TEXT_FILE, deployed.text, TEXT_INPUT, TEXT_OUTPUT, random_token_ids(reference, EXAMPLE_BATCH, g)),
    )
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for file, tower, input_name, output_name, example in towers:
            export_tower(TowerEncoder(tower).eval(), example, tmp / file, input_name, output_name, opset)
        parity = check_parity(reference, tmp, dtype, checks)
        meta = export_metadata(reference, tmp, dtype, opset, provenance or {}, parity)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")  # the dir rename is atomic
    return meta


def export_tower(
    encoder: TowerEncoder, example: Tensor, path: Path, input_name: str, output_name: str, opset: int
):
    """One graph, batch axis dynamic; weights in PATH.data when the tower is too big for one protobuf."""
    nbytes = sum(p.numel() * p.element_size() for p in encoder.parameters())
    with contextlib.redirect_stdout(sys.stderr), torch.no_grad():  # the exporter reports progress on stdout
        program = torch.onnx.export(
            encoder,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
        program.save(str(path), external_data=nbytes > EXTERNAL_DATA_BYTES)


def graph_signature(path: Path) -> dict:
    """Input/output names, shapes ('batch' for the dynamic axis) and dtypes, and the opset, as written."""
    graph = onnx.load(str(path), load_external_data=False)

    def value(v) -> dict:
        t = v.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {
            "name": v.name,
            "shape": shape,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
        }

    opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    return {"input": value(graph.graph.input[0]), "output": value(graph.graph.output[0]), "opset": opset}


def preprocess_steps(cfg, h: int, w: int) -> list[str]:
    """open_clip's eval transform for this PreprocessCfg, in words a non-Python client can follow."""
    resize = {
        "shortest": f"resize (PIL {cfg.interpolation}) so the image covers {h}x{w} keeping its aspect ratio "
        f"(square: shorter side -> {h}, longer side -> floor({h} * longer / shorter)), then centre-crop to "
        f"{h}x{w} (offsets round((side - {h}) / 2))",
        "longest": f"resize (PIL {cfg.interpolation}) so the image fits in {h}x{w} keeping its aspect ratio, "
        f"then centre-pad to {h}x{w} with fill_color",
        "squash": f"resize (PIL {cfg.interpolation}) to {h}x{w}, ignoring the aspect ratio",
    }[cfg.resize_mode]
    return [
        f"convert to {cfg.mode}",
        resize,
        "to float32 in [0, 1] (value / 255), then per channel (x - mean) / std",
        f"layout [3, {h}, {w}] (channels first), batched as [batch, 3, {h}, {w}]",
    ]


def export_metadata(
    model: PrunableCLIP, export_dir: Path, dtype: str, opset: int, provenance: dict, parity: dict
) -> dict:
    """export.json: everything a client needs to feed the graphs and compare their outputs."""
    spec, tok, cfg = model.spec, get_tokenizer(model), preprocess_cfg(model)
    h, w = spec.vision.image_size
    towers = {}
    for key, file in (("image_encoder", IMAGE_FILE), ("text_encoder", TEXT_FILE)):
        signature = graph_signature(export_dir / file)
        if signature["opset"] != opset:
            raise JobError(f"opset {opset} was asked for, but torch.onnx wrote opset {signature['opset']}")
        files = sorted(p.name for p in export_dir.iterdir() if p.name.startswith(file))
        towers[key] = {"file": file, "files": files, **{k: v for k, v in signature.items() if k != "opset"}}
    logit_bias = None if model.logit_bias is None else model.logit_bias.item()
    versions = {
        "mope_dist": importlib.metadata.version("mope-dist"),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
    }
    versions.update(onnxscript=importlib.metadata.version("onnxscript"), onnxruntime=ort.__version__)
    return {
        "format": "mope-dist-onnx",
        "format_version": 1,
        **towers,
        "normalized": False,
        "usage": "outputs are raw embeddings: L2-normalise both; similarity = dot product; "
        "CLIP logits = logit_scale * similarity (+ logit_bias)",
        "embed_dim": spec.embed_dim,
        "logit_scale": math.exp(min(model.logit_scale.item(), math.log(100))),
        "logit_bias": logit_bias,
        "preprocess": {
            "image_size": [h, w],
            "mode": cfg.mode,
            "mean": list(cfg.mean),
            "std": list(cfg.std),
            "interpolation": cfg.interpolation,
            "resize_mode": cfg.resize_mode,
            "fill_color": cfg.fill_color,
            "steps": preprocess_steps(cfg, h, w),
        },
        "tokenizer": {
            "type": "open_clip SimpleTokenizer (CLIP byte-level BPE, lower-cased, whitespace cleaned)",
            "context_length": tok.context_length,
            "sot_token_id": tok.sot_token_id,
            "eot_token_id": tok.eot_token_id,
            "pad_token_id": 0,
            "kwargs": spec.tokenizer.get("kwargs", {}),
            "layout": "SOT, BPE ids, EOT, zero padding to context_length; longer texts are cut and end in EOT",
        },
        "dtype": dtype,
        "opset": opset,
        "provenance": provenance,
        "exported_with": versions,
        "parity": parity,
    }
