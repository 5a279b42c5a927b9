"""TensorBoard's view of a workdir: one events file that every run of the workdir appends to.

    tensorboard --logdir WORKDIR/tensorboard

`WORKDIR/tensorboard/events.out.tfevents.<time>.mla_moe` holds one record per logged step (an
`Event` whose `Summary` carries every scalar of the step). A resumed run drops the records past
its checkpoint, as `metrics.jsonl` drops its rows, so the curves never double back; a record cut
short by a hard kill is dropped when the file is next opened. (tensorboardX's `SummaryWriter`
would start a new file per run, named by the second it started, and leave the steps a killed
run logged past its checkpoint in the old one.)

The record format is TFRecord's: length (uint64), its masked CRC-32C (uint32), the serialized
`Event`, its masked CRC-32C (uint32), all little-endian. tensorboardX (an optional dependency)
provides the protos and the checksum.
"""

from __future__ import annotations

import math
import struct
import time

from mla_moe import paths

SUFFIX = ".mla_moe"


class EventsFile:
    """The workdir's events file in `directory` (an epath.Path, local or gs://)."""

    def __init__(self, directory):
        from tensorboardX.proto import event_pb2, summary_pb2
        from tensorboardX.record_writer import masked_crc32c

        self._event_pb2, self._summary_pb2, self._crc = event_pb2, summary_pb2, masked_crc32c
        self.directory = directory
        ours = sorted(directory.glob("events.out.tfevents.*" + SUFFIX)) if directory.exists() \
            else []
        if ours:
            self.path = ours[-1]
            self._rewrite(self._records())  # drops a record a hard kill cut short
        else:
            directory.mkdir(parents=True, exist_ok=True)
            self.path = directory / f"events.out.tfevents.{int(time.time())}{SUFFIX}"
            header = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
            self.path.write_bytes(self._record(header.SerializeToString()))

    def _record(self, data: bytes) -> bytes:
        head = struct.pack("<Q", len(data))
        return (head + struct.pack("<I", self._crc(head)) + data
                + struct.pack("<I", self._crc(data)))

    def _records(self) -> list[bytes]:
        """The file's complete records (the serialized events), in order."""
        blob, out, i = self.path.read_bytes(), [], 0
        while i + 12 <= len(blob):
            (n,) = struct.unpack_from("<Q", blob, i)
            if i + 16 + n > len(blob):
                break
            out.append(blob[i + 12:i + 12 + n])
            i += 16 + n
        return out

    def _rewrite(self, records: list[bytes]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(b"".join(self._record(r) for r in records))
        tmp.replace(self.path)

    def truncate_after(self, step: int) -> None:
        """Drops the logged steps past `step`."""
        keep = []
        for data in self._records():
            event = self._event_pb2.Event.FromString(data)
            if not event.HasField("summary") or event.step <= step:
                keep.append(data)
        self._rewrite(keep)

    def write(self, step: int, scalars: dict, wall_time: float) -> None:
        """Appends step `step`'s finite numeric `scalars` as one event."""
        values = [self._summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                  for k, v in scalars.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        event = self._event_pb2.Event(step=int(step), wall_time=wall_time,
                                      summary=self._summary_pb2.Summary(value=values))
        record = self._record(event.SerializeToString())
        if paths.is_url(self.path):  # object stores have no append: rewrite the object
            self.path.write_bytes(self.path.read_bytes() + record)
        else:
            with self.path.open("ab") as f:
                f.write(record)
