"""TensorBoard event files on a bucket through `etils.epath` (what Orbax uses), so that
``WORKDIR/tb`` of a ``gs://`` workdir needs no client besides the one epath already uses.

tensorboardX picks a writer by the URL prefix; `register` installs one for each scheme
`paths` supports. Object stores have no appends: the writer keeps the file's bytes and
rewrites the whole object on each flush (event files of scalars are small).
"""

from __future__ import annotations

import io

from . import paths


class _EpathRecordWriter:
    def __init__(self, path: str):
        self.path = paths.as_path(path)
        self.buffer = io.BytesIO()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        with self.path.open("wb") as f:
            f.write(self.buffer.getvalue())

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


class _EpathWriterFactory:
    def open(self, path: str) -> _EpathRecordWriter:
        return _EpathRecordWriter(path)

    def directory_check(self, path: str) -> None:
        paths.as_path(path).mkdir(parents=True, exist_ok=True)


def register() -> None:
    """Route tensorboardX's writes for every URL scheme of `paths` through epath."""
    from tensorboardX import record_writer
    for scheme in paths.URL_SCHEMES:
        record_writer.register_writer_factory(scheme, _EpathWriterFactory())
