"""Data for the built-in tasks: the movie review sentiment set, your own files, and a data module per task."""

from lora_lightning.app.data.classification import ClassificationDataModule
from lora_lightning.app.data.files import read_records
from lora_lightning.app.data.lm import CausalLMDataModule
from lora_lightning.app.data.vader import DataFetchError, movie_reviews_file, read_movie_reviews

__all__ = [
    "CausalLMDataModule",
    "ClassificationDataModule",
    "DataFetchError",
    "movie_reviews_file",
    "read_movie_reviews",
    "read_records",
]
