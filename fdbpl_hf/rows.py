"""A dataset's stored rows, whatever format or transform is set on it.

`dataset.with_format("torch")` hands out labels as tensors (`tensor(3)`: no stored digest, class
id or dict key equals it) and images as arrays; `dataset.with_transform(f)` hands out `f`'s output
instead of the rows. Table builds, replay, the image digests, evaluation and the class helpers read
what is stored: `stored_rows(dataset)` is the dataset without format or transform (a view: nothing
is copied). fdbpl_hf renders and normalises the images itself, so a transform is not applied,
and a warning says so (a change meant for the images belongs in the data: `dataset.map`).
"""

from __future__ import annotations

import warnings


def has_format(dataset) -> bool:
    """Whether reading `dataset`'s rows gives anything but the stored Python values of every column."""
    fmt = getattr(dataset, "format", None)
    if not isinstance(fmt, dict):
        return False
    columns = fmt.get("columns")
    return fmt.get("type") is not None or bool(fmt.get("format_kwargs")) or (
        columns is not None and list(columns) != list(dataset.column_names))


def stored_rows(dataset, where: str = "the dataset", warn: bool = True):
    """`dataset` without its format or transform (`with_format(None)`); a transform, which is
    dropped, is named in a warning unless `warn=False`."""
    if not has_format(dataset):
        return dataset
    fmt = dataset.format
    if warn and (fmt.get("type") == "custom" or "transform" in (fmt.get("format_kwargs") or {})):
        warnings.warn(f"{where} has a transform (with_transform / set_transform): fdbpl_hf reads the stored images "
                      "and labels and renders regions itself, so the transform is not applied. To change the "
                      "images, store the change in the data (dataset.map(...)).", UserWarning, stacklevel=3)
    return dataset.with_format(None)


def with_format_of(result, original):
    """`result` (computed from `stored_rows(original)`) with `original`'s format or transform again."""
    if not has_format(original):
        return result
    fmt = original.format
    columns = fmt.get("columns")
    if columns is not None and not set(columns) <= set(result.column_names):
        columns = None
    return result.with_format(fmt.get("type"), columns=columns, output_all_columns=fmt.get("output_all_columns", False),
                              **(fmt.get("format_kwargs") or {}))
