"""CMA-CLIP: Cross-Modality Attention CLIP for multi-task image-text classification.

    from cma_clip import Predictor
    predictor = Predictor.from_checkpoint("checkpoints/hm-articles")
    prediction = predictor.predict(image, "Striped cotton shirt")

Modules: backbones (dual encoders), align (CLIP-style alignment), model (CMA-CLIP),
data (catalogues, feature cache), train / evaluate / predict (command lines),
metrics, checkpoint (safetensors + JSON).
"""
from .backbones import BackboneError, DualEncoder, EncoderOutput, create_backbone
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import Catalogue, CatalogueConfig, CatalogueError
from .model import CMAClip, CMAClipConfig, CMAOutput
from .predict import Prediction, Predictor

__all__ = ["BackboneError", "CMAClip", "CMAClipConfig", "CMAOutput", "Catalogue", "CatalogueConfig",
           "CatalogueError", "CheckpointError", "DualEncoder", "EncoderOutput", "Prediction", "Predictor",
           "create_backbone", "load_checkpoint", "save_checkpoint"]
