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
from .backbones import BackboneError, DualEncoder, EncoderOutput, create_backbone
from .checkpoint import (CheckpointConfig, CheckpointError, TrainConfig, load_backbone, load_checkpoint,
                         save_checkpoint)
from .data import Catalogue, CatalogueConfig, CatalogueError
from .errors import CMAClipError
from .model import CMAClip, CMAClipConfig, CMAOutput, Ensemble
from .predict import Prediction, Predictor

__all__ = ["BackboneError", "CMAClip", "CMAClipConfig", "CMAClipError", "CMAOutput", "Catalogue", "CatalogueConfig",
           "CatalogueError", "CheckpointConfig", "CheckpointError", "DualEncoder", "EncoderOutput", "Ensemble", "Prediction",
           "Predictor", "TrainConfig", "create_backbone", "load_backbone", "load_checkpoint", "save_checkpoint"]
