"""ESP-MedSAM: efficient self-prompting SAM for universal 2D medical image segmentation."""

from espmedsam.config import ModelConfig
from espmedsam.modalities import MODALITIES
from espmedsam.models.espmedsam import ESPMedSAM, ESPOutput
from espmedsam.models.registry import build_model

__all__ = ["MODALITIES", "ESPMedSAM", "ESPOutput", "ModelConfig", "build_model"]
__version__ = "0.1.0"
