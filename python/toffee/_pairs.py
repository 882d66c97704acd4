"""``toffee.pairs``: the dataset job (``toffee pairs``) through the library's runner."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

from . import _toffee

_Path = Union[str, "os.PathLike[str]"]


def pairs(
    out: _Path,
    config: Union[None, _Path, Mapping[str, Any]] = None,
    *,
    subjects: Optional[_Path] = None,
    templates: Optional[_Path] = None,
    devices: Union[str, Sequence[str]] = "cpu",
    batch: Optional[int] = None,
    keep_rejected: bool = False,
    shard_index: Optional[int] = None,
    num_shards: Optional[int] = None,
    progress: Union[None, bool, Callable[[int, int], Any]] = None,
) -> Dict[str, Any]:
    """Runs (or resumes) a pairs job into the folder ``out`` (WebDataset shards ``pairs-*.tar``,
    index.jsonl, stats.json, job.json), as ``toffee pairs --out OUT`` does.

    ``config``: a pairs.toml path, a dict with the same tables (``{"job": {"resolution": 64}}``;
    written for the run as a temporary TOML file in the current folder, so relative paths in it
    are relative to the current folder), or None for the built-in demo. ``subjects``, ``templates``, ``devices`` (``"cpu"``, ``"cuda:0,cuda:1"`` or a list),
    ``batch``, ``keep_rejected``, ``shard_index`` / ``num_shards``: the CLI's flags.
    ``progress``: ``progress(done, total)`` (records) after every shard, on the calling thread;
    returning True stops the run after the batch in flight (the returned summary then has
    ``stopped`` True). ``progress=True`` shows the CLI's progress bar on stderr instead.

    Ctrl-C (KeyboardInterrupt) stops like the CLI's first Ctrl-C: the batch in flight finishes,
    the unfinished shard is dropped (no temporary file stays), then KeyboardInterrupt is raised;
    calling ``pairs`` again with the same arguments continues the job. Unlike the CLI, a second
    Ctrl-C does not exit at once: the batch in flight still finishes (the second KeyboardInterrupt
    is raised after the first).

    Returns stats.json's fields (``records``, ``kept``, ``rejected``, …) plus ``shards_built``,
    ``shards_skipped`` and ``stopped``. Errors raise ToffeeError.
    """
    config_path = config_json = None
    if isinstance(config, Mapping):
        config_json = json.dumps(config)
    elif config is not None:
        config_path = os.fspath(config)
    if isinstance(devices, str):
        devices = devices.split(",")
    callback = progress if callable(progress) else None
    summary = _toffee.pairs(
        os.fspath(out),
        config=config_path,
        config_json=config_json,
        subjects=None if subjects is None else os.fspath(subjects),
        templates=None if templates is None else os.fspath(templates),
        devices=[d.strip() for d in devices],
        batch=batch,
        keep_rejected=keep_rejected,
        shard_index=shard_index,
        num_shards=num_shards,
        progress=callback,
        show_progress=progress is True,
    )
    return json.loads(summary)
