"""meddiff: distributed diffusion models for medical imaging, built on Ray.

Two jobs: morphology-prompted histopathology synthesis (Stable Diffusion fine-tuned on prompts built
from DINO embeddings) and THOR anomaly detection (a DDPM with temporal harmonization). Importing this
package has no side effects; heavy libraries are imported where they are used.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("meddiff")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
