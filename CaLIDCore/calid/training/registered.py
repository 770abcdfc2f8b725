"""Training data of registration-guided CaLID models: the neighbours moved to the middle of their gap.

A registration-guided denoiser (``DenoiserConfig.registered_neighbours``) sees the two neighbours
of a gap after the model-free registration has moved them to its middle. Registering one pair
takes about 0.16 s on one core at 96 x 96 pixels, and a training run draws every triplet in
every epoch, so the moved pairs are computed once, in parallel, and kept: in memory, and on disk
next to the run's other caches (a resumed run reads them back). Validation items are moved when
first drawn and remembered.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from calid.atomic import atomic_path
from calid.errors import CalidError
from calid.data.datasets import SubjectVolume
from calid.inference.registration import RegistrationSettings, _cores, moved_to_middle

#: ``progress(done, total)`` while the pairs are registered.
Progress = Callable[[int, int], None]


class MovedNeighbourTable:
    """``table(volume, frame, n, gap)`` -> the (2, H, W) neighbours of slice ``n`` moved to it.

    Args:
        volumes: the preprocessed subjects (normalised crops at the model's pixel size).
        entries: the (volume, frame, n, gap) items to compute now (``TripletDataset.index``); none
            for a lazy table, which moves an item when it is first asked for.
        pixel_mm: the crops' pixel size.
        cache_folder: where the computed pairs are kept between runs, in a float16 ``.npz`` named
            after what they depend on (the volumes, entries, pixel size and settings), so runs
            on other data or splits sharing the folder keep their own.
        workers: pairs registered at once (default: one per core).
    """

    FORMAT = "calid-moved-neighbours-1"

    def __init__(
        self,
        volumes: Sequence[SubjectVolume],
        pixel_mm: float,
        entries: Sequence[tuple[int, int, int, int]] = (),
        settings: RegistrationSettings = RegistrationSettings(),
        cache_folder: Path | None = None,
        workers: int | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.volumes = list(volumes)
        self.pixel_mm = float(pixel_mm)
        self.settings = settings
        self.pairs: dict[tuple[int, int, int, int], np.ndarray] = {}
        self.loaded_from_cache = False
        self.seconds = 0.0
        entries = [(int(v), int(t), int(n), int(gap)) for v, t, n, gap in entries]
        #: What the computed pairs depend on ("" for a lazy table); part of the latent cache's signature.
        self.key = self.signature(entries) if entries else ""
        #: The file of this table in ``cache_folder`` (None without a folder or entries).
        self.cache_file = self.file_in(cache_folder, self.key) if cache_folder is not None and entries else None
        if not entries:
            return
        if self.cache_file is not None and self._load(self.cache_file, entries, self.key):
            self.loaded_from_cache = True
            return
        started = time.perf_counter()
        done = 0
        with ThreadPoolExecutor(max_workers=max(1, workers or _cores())) as pool:
            for entry, pair in zip(entries, pool.map(self._compute, entries)):
                self.pairs[entry] = pair
                done += 1
                if progress is not None and (done % 200 == 0 or done == len(entries)):
                    progress(done, len(entries))
        self.seconds = time.perf_counter() - started
        #: Whether the computed pairs reached the cache folder.
        self.saved = self.cache_file is not None and self._save(self.cache_file, entries, self.key)

    @staticmethod
    def file_in(folder: Path, key: str) -> Path:
        """The cache file of the table with signature ``key`` in ``folder``."""
        return folder / f"moved-neighbours-{key[:16]}.npz"

    def signature(self, entries: Sequence[tuple[int, int, int, int]]) -> str:
        """What the moved pairs depend on: the volumes' data, the items, the pixel size and the settings."""
        digest = hashlib.sha256()
        digest.update(json.dumps({"format": self.FORMAT, "pixel_mm": self.pixel_mm, "settings": self.settings.to_dict()}).encode())
        for volume in self.volumes:
            data = np.ascontiguousarray(volume.data)
            digest.update(f"{volume.subject}|{data.dtype}|{data.shape}".encode())
            digest.update(data.tobytes())
        digest.update(np.asarray(entries, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def _compute(self, entry: tuple[int, int, int, int]) -> np.ndarray:
        v, t, n, gap = entry
        data = self.volumes[v].data
        # One pair per call: the table's own pool runs the pairs in parallel.
        return moved_to_middle(data[t, n - gap][None], data[t, n + gap][None], self.pixel_mm, self.settings)[0].astype(np.float16)

    def __call__(self, v: int, t: int, n: int, gap: int) -> np.ndarray:
        entry = (int(v), int(t), int(n), int(gap))
        pair = self.pairs.get(entry)
        if pair is None:
            # No lock (the table is pickled into loader workers): two threads asking for the same
            # new entry at once both compute it, with the same result.
            pair = self.pairs[entry] = self._compute(entry)
        return pair

    def _save(self, path: Path, entries: list[tuple[int, int, int, int]], signature: str) -> bool:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as handle:
                    np.savez(handle, format=np.asarray(self.FORMAT), signature=np.asarray(signature), pairs=np.stack([self.pairs[e] for e in entries]))
        except (OSError, CalidError) as error:
            # A read-only shared cache or a full disk costs later runs the registrations, never this run.
            warnings.warn(f"moved neighbours: cannot write {path} ({error}); later runs will register the training pairs again", stacklevel=2)
            return False
        return True

    def _load(self, path: Path, entries: list[tuple[int, int, int, int]], signature: str) -> bool:
        if not path.is_file():
            return False
        try:
            with np.load(path) as stored:
                if str(stored["format"]) != self.FORMAT or str(stored["signature"]) != signature:
                    return False
                pairs = stored["pairs"]
        except Exception:  # noqa: BLE001 - a damaged file (zip, pickle or format errors alike) is computed again
            return False
        if len(pairs) != len(entries):
            return False
        self.pairs = {entry: pair for entry, pair in zip(entries, pairs)}
        return True
