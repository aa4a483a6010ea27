"""ESP-MedSAM: efficient self-prompting SAM for universal 2D medical image segmentation."""

from espmedsam.checkpoints.importers import import_mobilesam, import_official
from espmedsam.checkpoints.litemedsam import import_litemedsam
from espmedsam.checkpoints.native import load_model, save_model
from espmedsam.checkpoints.sam import import_sam
from espmedsam.config import ModelConfig
from espmedsam.modalities import MODALITIES
from espmedsam.models.espmedsam import ESPMedSAM, ESPOutput
from espmedsam.models.registry import build_model
from espmedsam.predict import Predictor
from espmedsam.prompting import Prompts

__all__ = [
    "MODALITIES",
    "ESPMedSAM",
    "ESPOutput",
    "ModelConfig",
    "Predictor",
    "Prompts",
    "build_model",
    "import_litemedsam",
    "import_mobilesam",
    "import_official",
    "import_sam",
    "load_model",
    "save_model",
]
__version__ = "0.1.0"
