"""Fashion-MNIST files: where they come from, how they are read, how they are batched.

The facts about the data set itself live here, once: its classes and image size.
"""

from fmnist import FmnistError

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
NUM_CLASSES = len(CLASSES)
IMAGE_SIZE = 28  # pixels per side

RAW_DIR = "data/raw"
PROCESSED_DIR = "data/processed"


class DataError(FmnistError):
    """A data file is missing, corrupt or of the wrong shape. The message names the file."""
