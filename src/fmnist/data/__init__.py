"""Fashion-MNIST files: where they come from, how they are read, how they are batched."""

from fmnist import FmnistError

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

RAW_DIR = "data/raw"
PROCESSED_DIR = "data/processed"
SPLITS = ("train", "val", "test")


class DataError(FmnistError):
    """A data file is missing, corrupt or of the wrong shape. The message names the file."""
