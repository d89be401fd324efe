__all__ = [
    "BadImageError",
    "DataError",
    "DatasetNotPreparedError",
    "UnknownDatasetError",
]

"""Errors the input pipeline raises for problems the user has to fix (bad files, unknown names).

All derive from `DataError` (a `ValueError`), so a CLI can catch one class and print its message
as a single line. Each message names the dataset, folder or file and says what to do.
"""


class DataError(ValueError):
    """A dataset, split, folder or config value the input pipeline cannot use."""


class UnknownDatasetError(DataError):
    """`config.dataset` is neither 'digits', an existing folder, nor a tfds dataset name."""


class DatasetNotPreparedError(DataError):
    """A tfds dataset is not in the data dir and could not be downloaded and prepared."""


class BadImageError(DataError):
    """An image file (or record) cannot be decoded: corrupted, truncated or not an image."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = path
