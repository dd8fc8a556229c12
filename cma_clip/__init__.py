"""CMA-CLIP: Cross-Modality Attention CLIP for multi-task image-text classification.

    from cma_clip import Predictor
    predictor = Predictor.from_checkpoint("checkpoints/hm-articles")
    prediction = predictor.predict(image, "Striped cotton shirt")

The library: backbones (dual encoders; mobilenet, the second image tower), align (CLIP-style
alignment), model (CMA-CLIP), checkpoint (typed config + safetensors), data (catalogues), features (the feature cache),
train / evaluate / predict (command lines), metrics, labels (the label store), review,
noise, robustness, viz. On top of it: `cma_clip.studio` (the app's service) and
`cma_clip.lab` (benchmarks and the study); see docs/ARCHITECTURE.md.
"""
from importlib import import_module

# the public names, by module: imported on first use, so `python -m cma_clip.predict` (or any
# command of the package) runs its module once, as the command, not also as a dependency of this file
_EXPORTS = {
    "backbones": ["BackboneError", "DualEncoder", "EncoderOutput", "create_backbone"],
    "checkpoint": ["CheckpointConfig", "CheckpointError", "TrainConfig", "load_backbone", "load_checkpoint",
                   "save_checkpoint"],
    "data": ["Catalogue", "CatalogueConfig", "CatalogueError"],
    "errors": ["CMAClipError"],
    "model": ["CMAClip", "CMAClipConfig", "CMAOutput", "Ensemble"],
    "predict": ["Prediction", "Predictor"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_MODULE_OF[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
