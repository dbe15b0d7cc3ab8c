"""metrics.jsonl: one line per committed epoch, a mirror of the records the checkpoint keeps.

The checkpoint is the truth: each commit stores every epoch's record, and the file is brought in line with them
after the commit point (appended where it is a prefix, else rewritten by rename). So no line lands before its
epoch commits, a line lost to a crash or a full disk is written by the next writer, and a symlink standing in
for the file is replaced, never written through.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sam_cls.fault import fault_point
from sam_cls.files import NotRegularFileError, open_file, read_bytes


class MetricsFile:
    """The per-epoch records of a run directory (RunDir sets `metrics`, the file's path)."""

    metrics: Path

    def sync_metrics(self, state: dict) -> None:
        """metrics.jsonl := the committed state's per-epoch records (appended where it is a prefix of them), so
        the file never holds a line of an epoch that did not commit."""
        records = state.get("history")
        if records is None:  # a checkpoint from before it kept them: drop only lines ahead of it
            self.truncate_metrics(int(state.get("step", 0)))
            return
        want = "".join(json.dumps(record) + "\n" for record in records)
        have = self._text()
        if have == want:
            return
        if have is not None and want.startswith(have):
            with open_file(self.metrics, "ab") as f:
                f.write(want[len(have):].encode())
                fault_point("metrics-line")
                f.flush()
                os.fsync(f.fileno())
        else:
            self._write_metrics(want)

    def _text(self) -> str | None:
        """metrics.jsonl's text; "" when there is none, None when something other than a file stands there."""
        try:
            return read_bytes(self.metrics).decode(errors="replace")
        except FileNotFoundError:
            return ""
        except NotRegularFileError:
            return None

    def _write_metrics(self, text: str) -> None:
        tmp = self.metrics.with_name(self.metrics.name + ".tmp")
        tmp.unlink(missing_ok=True)
        try:
            with open_file(tmp, "wb") as f:
                f.write(text.encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.metrics)  # a symlink in its place is replaced, never written through
        finally:
            tmp.unlink(missing_ok=True)

    def _lines(self) -> list[tuple[str, dict | None]]:
        """Each metrics line with its record; None for a line cut short by an interrupted write."""
        out = []
        for line in (self._text() or "").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            out.append((line, record if isinstance(record, dict) else None))
        return out

    def load_metrics(self) -> list[dict]:
        """The per-epoch records, oldest first."""
        return [record for _, record in self._lines() if record is not None]

    def truncate_metrics(self, steps_done: int) -> None:
        """Drop metrics of epochs whose checkpoint never landed, so a resumed run does not repeat lines."""
        lines = self._lines()
        kept = [line for line, record in lines
                if record is not None and record.get("step", steps_done + 1) <= steps_done]
        if len(kept) != len(lines) or self._text() is None:
            self._write_metrics("".join(ln + "\n" for ln in kept))
