"""Every setting medsim reads from the environment, read in one place.

``get()`` reads the environment once per process and keeps the result; a command line flag
that overrides a setting is applied by the command (``--database-url``), never by writing
to the environment. Tests that change the environment call ``reset()`` (an autouse
fixture does).

| variable | setting | default |
| --- | --- | --- |
| DATABASE_URL | database_url | unset: libpq's PG* variables, else the embedded server |
| PGHOST, PGDATABASE, PGSERVICE | libpq | (any of them set: let libpq resolve the server) |
| DATABASE_READ_URL | read_url | unset: searches read the main database |
| MEDSIM_HOME | home | the per-user data directory (platformdirs) |
| MEDSIM_PATIENT_KEY | patient_key | unset: archives are refused (identifiers are stored keyed) |
| MEDSIM_PATIENT_KEY_PREVIOUS | patient_keys_previous | keys before the last rotation, one per line |
| MEDSIM_NEW_PATIENT_KEY | new_patient_key | (medsim keys rotate only) the key to rotate to |
| MEDSIM_MAX_IMAGE_PIXELS | max_image_pixels | 40,000,000 |
| MEDSIM_DATA_DIR | data_dir | unset: MedMNIST files are looked for in ~/.medmnist |
| OMP_NUM_THREADS | omp_threads | unset: workers divide the cores among themselves |
| MEDSIM_RUNTIME | runtime | onnx: the worker and the service embed with ONNX Runtime where it matches torch |
| MEDSIM_PACS_USER, MEDSIM_PACS_PASSWORD | pacs_user, pacs_password | unset: no basic authentication to the PACS |
| MEDSIM_PACS_TOKEN | pacs_token | unset: no bearer token (it wins over a user and password) |
| MEDSIM_PACS_TIMEOUT | pacs_timeout | 30 (seconds for one request to the PACS) |
| MEDSIM_PACS_MAX_BYTES | pacs_max_bytes | 1 GiB (the largest answer read from the PACS, checked before its body) |

PACS credentials are read here at every sync and every fetch of an original, and never
written to the database: a source's row keeps its URL only.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

LIBPQ_VARS = ("PGHOST", "PGDATABASE", "PGSERVICE")

# A query image is untrusted input: its size is checked from the header, before any
# pixel is decoded (Pillow's own decompression-bomb limit is 89 M pixels, and it only warns
# below twice that). The same limit applies to files an ingest reads and to uploads.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    libpq: bool = False
    read_url: str | None = None
    home: Path | None = None
    patient_key: str | None = field(default=None, repr=False)  # a secret: never printed
    patient_keys_previous: tuple = field(default=(), repr=False)  # oldest first (medsim keys rotate)
    new_patient_key: str | None = field(default=None, repr=False)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    data_dir: Path | None = None
    omp_threads: int | None = None
    runtime: str = "onnx"
    pacs_user: str | None = None
    pacs_password: str | None = field(default=None, repr=False)
    pacs_token: str | None = field(default=None, repr=False)
    pacs_timeout: int = 30
    pacs_max_bytes: int = 1 << 30

    @classmethod
    def from_env(cls, env=None) -> Settings:
        env = os.environ if env is None else env

        def text(name):
            return env.get(name) or None

        def number(name, default=None):
            value = text(name)
            if value is None:
                return default
            try:
                return int(value)
            except ValueError:
                from medsim.errors import BadArgument

                raise BadArgument(f"{name} must be a whole number, got {value!r}") from None

        home = text("MEDSIM_HOME")
        data_dir = text("MEDSIM_DATA_DIR")
        return cls(database_url=text("DATABASE_URL"), libpq=any(text(v) for v in LIBPQ_VARS),
                   read_url=text("DATABASE_READ_URL"),
                   home=Path(home).expanduser().resolve() if home else _user_data_dir(),
                   patient_key=text("MEDSIM_PATIENT_KEY"),
                   patient_keys_previous=tuple(k for k in (text("MEDSIM_PATIENT_KEY_PREVIOUS") or "").splitlines()
                                               if k),
                   new_patient_key=text("MEDSIM_NEW_PATIENT_KEY"),
                   max_image_pixels=number("MEDSIM_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS),
                   data_dir=Path(data_dir).expanduser() if data_dir else None,
                   omp_threads=number("OMP_NUM_THREADS"), runtime=text("MEDSIM_RUNTIME") or "onnx",
                   pacs_user=text("MEDSIM_PACS_USER"), pacs_password=text("MEDSIM_PACS_PASSWORD"),
                   pacs_token=text("MEDSIM_PACS_TOKEN"), pacs_timeout=number("MEDSIM_PACS_TIMEOUT", 30),
                   pacs_max_bytes=number("MEDSIM_PACS_MAX_BYTES", 1 << 30))


def _user_data_dir() -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import platformdirs

        return Path(platformdirs.user_data_dir("medsim"))


@lru_cache(maxsize=1)
def get() -> Settings:
    return Settings.from_env()


def reset() -> None:
    """Forget what was read: the next get() reads the environment again."""
    get.cache_clear()
