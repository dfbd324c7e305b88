"""Import an open_clip CLIP (name + pretrained, `local-dir:`, or a built module) into a PrunableCLIP.

Everything that changes the embeddings is carried over (activation, layer scale, ln_pre, pooling, final
LN placement, causal mask, projection type, norm eps); features open_clip has but this model does not
reproduce raise ValueError instead of silently producing different embeddings.

Weights that cannot be loaded into the named model (another architecture, a damaged or non-checkpoint
file, an unknown pretrained tag) raise a one-line ConfigError naming both, before any other work.
Weight files are read by open_clip with safetensors or torch.load(weights_only=True): never pickle.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import open_clip
from open_clip.transform import PreprocessCfg
from torch import nn

from ..errors import ConfigError
from .clip import PrunableCLIP, build_on_meta
from .io import get_tokenizer, is_model_dir, load_model, transforms
from .spec import CLIPSpec, TextSpec, VisionSpec

SUPPORTED = (
    "supported: open_clip CLIP/CustomTextCLIP with a VisionTransformer image tower and a TextTransformer "
    "text tower (default blocks, learnable or sin-cos position embedding, pool 'tok'/'avg', any patch size "
    "and width, GELU/QuickGELU/tanh-GELU, optional layer scale, ln_pre, final_ln_after_pool; text pool "
    "argmax/eos/first/last, causal or bidirectional, projection param/linear/none)"
)


def _unsupported(what: str) -> ValueError:
    return ValueError(f"cannot import {what}; {SUPPORTED}")


def _activation(mod: nn.Module) -> str:
    if isinstance(mod, open_clip.transformer.QuickGELU):
        return "quick_gelu"
    if isinstance(mod, nn.GELU):
        return "gelu_tanh" if mod.approximate == "tanh" else "gelu"
    raise _unsupported(f"activation {type(mod).__name__}")


def _check_blocks(resblocks: nn.ModuleList, where: str) -> None:
    for blk in resblocks:
        if type(blk) is not open_clip.transformer.ResidualAttentionBlock:
            raise _unsupported(f"{where} block type {type(blk).__name__}")
        attn = blk.attn
        if attn.in_proj_weight is None or attn.bias_k is not None or attn.in_proj_bias is None:
            raise _unsupported(f"{where} attention without packed biased in_proj or with bias_k/v")
        if hasattr(blk, "ln_1_kv"):
            raise _unsupported(f"{where} cross-attention block")


def _tower_common(resblocks: nn.ModuleList, where: str) -> dict:
    _check_blocks(resblocks, where)
    first = resblocks[0]
    width = first.ln_1.normalized_shape[0]
    heads = first.attn.num_heads
    return dict(
        width=width,
        head_dim=width // heads,
        heads=[b.attn.num_heads for b in resblocks],
        mlp_dims=[b.mlp.c_fc.out_features for b in resblocks],
        layer_scale=not isinstance(first.ls_1, nn.Identity),
        norm_eps=first.ln_1.eps,
    )


def _block_state(prefix: str, resblocks: nn.ModuleList, layer_scale: bool) -> dict:
    sd = {}
    for i, b in enumerate(resblocks):
        p = f"{prefix}.blocks.{i}."
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = b.ln_1.weight, b.ln_1.bias
        sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"] = b.attn.in_proj_weight, b.attn.in_proj_bias
        sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = (
            b.attn.out_proj.weight,
            b.attn.out_proj.bias,
        )
        sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = b.ln_2.weight, b.ln_2.bias
        for name in ("c_fc", "c_proj"):
            lin = getattr(b.mlp, name)
            sd[p + f"mlp.{name}.weight"], sd[p + f"mlp.{name}.bias"] = lin.weight, lin.bias
        if layer_scale:
            sd[p + "ls_1.gamma"], sd[p + "ls_2.gamma"] = b.ls_1.gamma, b.ls_2.gamma
    return sd


def _vision(v: nn.Module) -> tuple[dict, dict, str]:
    if not isinstance(v, open_clip.transformer.VisionTransformer):
        raise _unsupported(f"image tower {type(v).__name__}")
    if v.attn_pool is not None:
        raise _unsupported("an attentional pooler")
    if v.pool_type not in ("tok", "avg"):
        raise _unsupported(f"vision pool_type {v.pool_type!r}")
    if v.proj is None:
        raise _unsupported("an image tower without projection")
    common = _tower_common(v.transformer.resblocks, "image tower")
    spec = dict(
        **common,
        image_size=list(v.image_size),
        patch_size=list(v.patch_size),
        pool_type=v.pool_type,
        ln_pre=not isinstance(v.ln_pre, nn.Identity),
        final_ln_after_pool=bool(v.final_ln_after_pool),
    )
    sd = {
        "visual.conv1.weight": v.conv1.weight,
        "visual.class_embedding": v.class_embedding,
        "visual.positional_embedding": v.positional_embedding,
        "visual.ln_post.weight": v.ln_post.weight,
        "visual.ln_post.bias": v.ln_post.bias,
        "visual.proj": v.proj,
        **_block_state("visual", v.transformer.resblocks, common["layer_scale"]),
    }
    if spec["ln_pre"]:
        sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"] = v.ln_pre.weight, v.ln_pre.bias
    return spec, sd, _activation(v.transformer.resblocks[0].mlp.gelu)


def _text(model: nn.Module) -> tuple[dict, dict, str]:
    """open_clip.CLIP keeps the text tower's parts on the model itself; CustomTextCLIP has model.text."""
    if hasattr(model, "text"):
        t = model.text
        if not isinstance(t, open_clip.transformer.TextTransformer):
            raise _unsupported(f"text tower {type(t).__name__}")
        parts = t
        pool_type, eos_id = t.pool_type, t.eos_id
        extra = dict(
            embed_cls=t.cls_emb is not None,
            pad_mask=bool(t.use_pad_mask),
            pad_id=int(t.pad_id),
            correct_cls_mask=bool(t.correct_cls_mask),
        )
    else:  # open_clip.CLIP ignores embed_cls and padding masks in encode_text
        parts = model
        pool_type, eos_id = model.text_pool_type, model.text_eos_id
        extra = {}
    if pool_type not in ("argmax", "eos", "first", "last"):
        raise _unsupported(f"text pool_type {pool_type!r}")
    resblocks = parts.transformer.resblocks
    common = _tower_common(resblocks, "text tower")
    proj = parts.text_projection
    proj_type = "none" if proj is None else "linear" if isinstance(proj, nn.Linear) else "param"
    if proj_type == "linear" and proj.bias is None:
        raise _unsupported("a bias-free nn.Linear text projection")
    spec = dict(
        **common,
        **extra,
        context_length=parts.context_length,
        vocab_size=parts.token_embedding.num_embeddings,
        pool_type=pool_type,
        eos_id=int(eos_id),
        causal=parts.attn_mask is not None,
        proj_type=proj_type,
    )
    sd = {
        "text.token_embedding.weight": parts.token_embedding.weight,
        "text.positional_embedding": parts.positional_embedding,
        "text.ln_final.weight": parts.ln_final.weight,
        "text.ln_final.bias": parts.ln_final.bias,
        **_block_state("text", resblocks, common["layer_scale"]),
    }
    if extra.get("embed_cls"):
        sd["text.cls_emb"] = parts.cls_emb
    if proj_type == "linear":
        sd["text.text_projection.weight"], sd["text.text_projection.bias"] = proj.weight, proj.bias
    elif proj_type == "param":
        sd["text.text_projection"] = proj
    return spec, sd, _activation(resblocks[0].mlp.gelu)


def convert_open_clip_module(model: nn.Module, tokenizer_info: dict | None = None) -> PrunableCLIP:
    """Build a PrunableCLIP with exactly the weights and behaviour of an open_clip CLIP module."""
    if not isinstance(model, (open_clip.CLIP, open_clip.CustomTextCLIP)) or type(model).__name__ == "CoCa":
        raise _unsupported(f"model class {type(model).__name__}")
    vspec, vsd, vact = _vision(model.visual)
    tspec, tsd, tact = _text(model)
    if vact != tact:
        raise _unsupported(f"different activations per tower ({vact} vs {tact})")
    if vspec["width"] % vspec["head_dim"] or tspec["width"] % tspec["head_dim"]:
        raise _unsupported("a width not divisible by the head count")
    logit_scale = model.logit_scale.detach().float().reshape(-1)
    logit_bias = None if model.logit_bias is None else float(model.logit_bias.detach().reshape(-1)[0])
    pp = open_clip.get_model_preprocess_cfg(model)
    preprocess = asdict(
        PreprocessCfg(**{k: v for k, v in pp.items() if k in PreprocessCfg.__dataclass_fields__})
    )
    preprocess = {k: list(v) if isinstance(v, tuple) else v for k, v in preprocess.items()}
    spec = CLIPSpec(
        embed_dim=model.visual.proj.shape[1],
        vision=VisionSpec(**vspec),
        text=TextSpec(**tspec),
        activation=vact,
        init_logit_scale=float(logit_scale[0]),
        init_logit_bias=logit_bias,
        preprocess=preprocess,
        tokenizer=tokenizer_info
        or {"type": "simple", "context_length": tspec["context_length"], "kwargs": {}},
    )
    out = build_on_meta(spec)
    sd = {**vsd, **tsd, "logit_scale": model.logit_scale.detach().reshape(())}
    if logit_bias is not None:
        sd["logit_bias"] = model.logit_bias.detach().reshape(())
    sd = {k: v.detach().clone().float() for k, v in sd.items()}
    out.load_state_dict(sd, strict=True, assign=True)
    return out.train(model.training)


def _model_cfg(name: str) -> dict | None:
    """The open_clip model config dict behind a name or `local-dir:` path (for tokenizer settings)."""
    if name.startswith("local-dir:"):
        path = Path(name[len("local-dir:") :]) / "open_clip_config.json"
        return json.loads(path.read_text())["model_cfg"] if path.is_file() else None
    return open_clip.get_model_config(name.replace("/", "-"))


def _tokenizer_info(name: str, context_length: int) -> dict:
    text_cfg = (_model_cfg(name) or {}).get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name") or "siglip" in name.lower():
        raise _unsupported(f"{name!r}: only open_clip's SimpleTokenizer (CLIP BPE) models are")
    return {
        "type": "simple",
        "context_length": context_length,
        "kwargs": dict(text_cfg.get("tokenizer_kwargs") or {}),
    }


def from_open_clip(model_or_name: nn.Module | str, pretrained: str | None = None) -> PrunableCLIP:
    """Import from an open_clip module, a model name + pretrained tag or local weights path, or `local-dir:DIR`."""
    if isinstance(model_or_name, nn.Module):
        return convert_open_clip_module(model_or_name)
    name = model_or_name
    if pretrained and name.startswith("local-dir:"):
        raise ConfigError(
            f"teacher.pretrained={pretrained!r} would be ignored by open_clip for {name!r} (a local-dir: "
            "model loads only the weights inside its directory, e.g. open_clip_model.safetensors)"
        )
    try:
        oc_model = open_clip.create_model(name, pretrained=pretrained, device="cpu", precision="fp32")
    except Exception as e:
        if not pretrained:
            raise
        lines = str(e).strip().splitlines()
        detail = next((line.strip() for line in lines[1:] if line.strip()), "") if len(lines) > 1 else ""
        first = f"{lines[0]} {detail}".strip() if lines else ""
        raise ConfigError(
            f"teacher weights {pretrained!r} cannot be loaded into open_clip model {name!r}: "
            f"{type(e).__name__}: {first[:300]}"
        ) from e
    info = _tokenizer_info(name, oc_model.context_length)
    return convert_open_clip_module(oc_model.eval(), info)


def load_teacher(name: str, pretrained: str | None = None):
    """-> (PrunableCLIP, preprocess_train, preprocess_val, tokenizer) for an open_clip name/`local-dir:`,
    or a mope-dist model directory (a pruned student can be the next stage's teacher)."""
    if is_model_dir(name):
        if pretrained:
            raise ConfigError(
                f"teacher.pretrained={pretrained!r} makes no sense for the mope-dist model directory "
                f"{name} (its weights are its model.safetensors)"
            )
        try:
            model = load_model(name)
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise ConfigError(
                f"teacher.name: model directory {name} cannot be loaded ({type(e).__name__}: {first})"
            ) from e
    else:
        model = from_open_clip(name, pretrained)
    return model, *transforms(model), get_tokenizer(model)
