"""Results files: JSON lines, Markdown tables, files replaced atomically.

Machinery: a reader of the method may skip this file. Every script appends its figures as JSON lines
(log.jsonl, eval.jsonl, segment.jsonl) and Markdown rows that several runs share, and rewrites a file it
must not leave half-written (a checkpoint, the log on resume) by writing a copy and renaming it.
"""

import json
import os
import shutil

from data import DatasetError


def append_jsonl(path, record):
    """Append one result as a JSON line: the files every script appends to (log.jsonl, eval.jsonl, ...)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path):
    """The records of a JSON-lines file. A last line cut short (a kill while appending) is dropped, with a
    warning; a broken line anywhere else is an error naming it."""
    with open(path) as f:
        lines = f.read().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise DatasetError(f"{path}, line {number}, is not JSON; repair or delete that line") from None
            print(f"warning: {path} ends in a line cut short (a run killed while writing it); it is ignored")
    return records


def write_atomically(path, write):
    """Call write(f) on a new file beside `path`, flush and fsync it, then rename it over `path`: readers
    see the old file or the new one, never half of one, whenever the process dies. The temporary name
    is unique (a second process writing the same path never touches this one's bytes); after a failure
    the temporary file is removed and the error raised (`path` is left as it was); torch's zip writer's
    RuntimeError for a failed write becomes an OSError, as any other failed write is."""
    tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)       # atomic: same folder, same file system
    except BaseException as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        # torch.save's zip writer reports a full disk as a RuntimeError ("[enforce fail at inline_container.cc]
        # ... unexpected pos"); it is an OSError like any other failed write, so every caller catches one kind
        if isinstance(error, RuntimeError) and ("inline_container" in str(error) or "StreamWriter" in str(error)):
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
            raise OSError(f"the write stopped short, {free / 2**20:.1f} MiB free on that disk") from None
        raise
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)            # so that the rename itself survives a power cut
    finally:
        os.close(folder)


def markdown_header(columns):
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


def markdown_row(result, columns):
    """One table row: '| cifar10 | HyDeS | resnet18 | 200 | 72.54 | ... |' (blank where not measured)."""
    def cell(value):
        return f"{value:.2f}" if isinstance(value, float) else ("" if value is None else str(value))
    return "| " + " | ".join(cell(result.get(c)) for c in columns) + " |"


def keep_results(result, json_path, rows, pictures=()):
    """Save what a script computed, most valuable first, so that a failure at output time never costs the
    work: each row (row, columns, table file or None) printed as a Markdown table, then the result
    appended as a JSON line to json_path, then each row appended to its table, then each picture
    (path, draw: a function that writes it) drawn. A write that fails costs only itself: the rest are still
    written, and then a one-line error names what was not saved and why (the printed rows hold the
    figures). Returns None when everything was saved."""
    for i, (row, columns, _) in enumerate(rows):
        print(("\n" if i else "") + markdown_header(columns))           # tables apart, by a blank line
        print(markdown_row(row, columns))
    lost = []
    writes = [(json_path, lambda: append_jsonl(json_path, result))]
    writes += [(table, lambda row=row, columns=columns, table=table: append_row(row, columns, table))
               for row, columns, table in rows if table]
    writes += list(pictures)
    for path, write in writes:
        try:
            write()
        except Exception as error:   # a full disk, a path through a file, a picture that cannot be drawn
            lost.append(f"{path} ({str(error).splitlines()[0] if str(error) else type(error).__name__})")
    if lost:
        raise SystemExit(f"error: could not write {'; '.join(lost)}; the figures printed above are the result, "
                         f"and everything else was saved")


def append_row(result, columns, table):
    """Append one Markdown row to `table`, a file several runs share (its header written when new)."""
    new = not os.path.exists(table) or os.path.getsize(table) == 0
    with open(table, "a") as f:
        f.write((markdown_header(columns) + "\n" if new else "") + markdown_row(result, columns) + "\n")
