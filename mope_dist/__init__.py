"""mope-dist: MoPE-CLIP structured pruning and distillation of CLIP models at pre-training scale."""

__version__ = "0.1.0"

# Loading a standalone model needs torch + open_clip; import them only when asked, so that light
# modules (config, utils) stay fast to import.
_MODEL_EXPORTS = ("load_model", "create_model_and_transforms", "get_tokenizer")
__all__ = list(_MODEL_EXPORTS)


def __getattr__(name):
    if name in _MODEL_EXPORTS:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'mope_dist' has no attribute {name!r}")
