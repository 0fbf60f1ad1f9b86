"""`Client.export`: a committed generation written as an image directory (as `cpcoord
export`), from the client's jobs, generation and read_generation calls; the image is
all or nothing (an error aborts the writer, nothing is left behind).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cpcoord.errors import ImageInvalid
from cpcoord.ranges import PAGE_SIZE, check_name

if TYPE_CHECKING:
    from cpcoord.api.client import Client


def export(
    client: Client,
    job: str,
    out: Path | str,
    generation: int,
    members: Sequence[str],
    data_path: str,
    store_key_file: Path | None,
) -> Path:
    """Write `job`'s generation (0 = the latest committed) under `out`; the image's path."""
    from cpcoord.image_writer import ImageWriter

    check_name(job)
    n = client.generation(job, generation).info.number
    procs = {m.name: (m.pid, m.start_time) for j in client.jobs(job) for m in j.members}
    writer = ImageWriter(Path(out), job=job, generation=n)
    try:
        pages = client.read_generation(
            job, n, members=members, data_path=data_path, store_key_file=store_key_file
        )
        for mp in pages:
            if mp.page_size != PAGE_SIZE:
                raise ImageInvalid(str(out), f"page size {mp.page_size} differs")
            pid, start = procs.get(mp.member, (0, 0))
            writer.add_member(mp.member, pid, start)
            for r in mp.regions:
                writer.add_region(
                    mp.member, pid, start, r.name, r.start, r.end, r.pages, r.data, r.zero
                )
        return Path(writer.commit().path)
    except BaseException:
        writer.abort()
        raise
