"""The files the scripts write whole or line by line, and how a file is read: checkpoints (saved
atomically, loaded safely, or named for what they are) and results records (JSON lines, Markdown rows).

Machinery: a reader of the method may skip this file. A kill never leaves a broken checkpoint (a copy
renamed over it: `write_atomically`), a file read never runs code (`safe_load`), one that is no checkpoint
is named in one line (`not_pytorch`: empty, a Git LFS pointer, a web page, ...), and every script's results
(log.jsonl, eval.jsonl, Markdown rows that several runs share: `keep_results`) are appended all or nothing.
"""

import argparse
import fcntl
import importlib.util
import json
import os
import pickle
import re
import shutil
import struct
import zipfile

import numpy as np
import torch

from image_files import DatasetError


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as asked; the message says why and what to do."""


def write_atomically(path, write):
    """Call write(f) on a new file beside `path`, then rename it over `path`: readers see the old file or
    the new one, never half of one, whenever the process dies. The temporary name is unique, so a second
    process writing the same path never touches this one's bytes. A `path` that is not a regular file
    (/dev/null, a folder, a pipe) is refused: the rename would replace the node itself, not write into it."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise OSError(f"{path} exists and is not a regular file (a device, folder or pipe); name a file")
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


def save_checkpoint(path, state, if_it_fails="the previous checkpoint, if any, is intact: free disk space or fix "
                                             "the folder, then continue with --resume"):
    """torch.save `state` through write_atomically; a write that fails (a full disk) says why, then `if_it_fails`."""
    try:
        write_atomically(path, lambda f: torch.save(state, f))
    except OSError as error:
        raise CheckpointError(f"cannot write {path} ({error.strerror or error}); {if_it_fails}") from None


# Plain data that checkpoints keep beside their tensors, rebuilt without running code, so allowed (torch 2.4
# and newer): DINO's settings, an argparse.Namespace; an ImageNet script's best accuracy, a numpy scalar
# (rebuilt by numpy's `scalar` from a dtype: numpy 1 names it numpy.core..., numpy 2 numpy._core...).
if hasattr(torch.serialization, "add_safe_globals"):
    _scalar = np.float64(0).__reduce__()[0]
    torch.serialization.add_safe_globals([argparse.Namespace, np.dtype, _scalar,
                                          *[(_scalar, f"numpy.{core}.multiarray.scalar") for core in ("core", "_core")],
                                          *{type(np.dtype(code)) for code in np.typecodes["All"]}])


def safe_load(path, trust_pickle=False):
    """torch.load with weights_only=True: tensors, numbers, strings and containers, never code. A file that
    holds anything else (a pickled model, say) is refused unread, naming what it would build, unless
    trust_pickle. A file that is no PyTorch file, or one cut short, is named for what it is."""
    try:
        problem = not_pytorch(path)
    except (FileNotFoundError, IsADirectoryError):
        raise CheckpointError(f"no checkpoint file at {str(path)!r}; pass the ckpt.pt that train.py wrote") from None
    except OSError as error:
        raise CheckpointError(f"cannot read {path} ({error.strerror or error})") from None
    if problem:
        raise CheckpointError(f"{path} is {problem}")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as error:
        if "truncated" in str(error):
            raise CheckpointError(f"{path} is {CUT_SHORT}") from None
        # torch names the first object the file would build: "Unsupported global: GLOBAL torchvision...ResNet"
        found = re.search(r"GLOBAL (\S+)", str(error))
        raise CheckpointError(f"{path} holds a pickled {found[1] if found else 'object'}, not only tensors and plain "
                              f"data, so it is refused unread (loading it runs code); pass --trust-pickle if you "
                              f"trust the file, or re-save its state_dict()") from None
    except (AttributeError, ImportError) as error:        # --trust-pickle: a class this Python does not have
        raise CheckpointError(f"{path} pickles a class that cannot be imported here ({error}); load it where its "
                              f"code is and save its state_dict()") from None
    except (EOFError, RuntimeError, IndexError, struct.error) as error:
        # the format before torch 1.6, cut short: its pickles end early wherever the cut falls
        if not isinstance(error, RuntimeError) or "unexpected EOF" in str(error):
            raise CheckpointError(f"{path} is {CUT_SHORT}") from None
        raise CheckpointError(f"{path} is not a readable PyTorch file ({str(error).strip()[:100]})") from None


CUT_SHORT = "not a readable PyTorch file: it was cut short (an interrupted download or copy?); fetch it again"


def not_pytorch(path):
    """What a file is when it is no whole PyTorch file (which begins as a zip archive, or as a pickle in
    the format before torch 1.6), by its first bytes, with what to do; None for a PyTorch file."""
    with open(path, "rb") as f:
        start = f.read(512)
    text = start.lstrip().lower()
    if not start:
        return "empty, 0 bytes (an interrupted copy?); copy or download it again"
    if start.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):                               # a zip's directory is at its end
            return CUT_SHORT
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(name.endswith("/constants.pkl") for name in names):
            return "a TorchScript archive (torch.jit.save); torch.jit.load it and torch.save its state_dict()"
        return None if any(name.endswith("data.pkl") for name in names) else (
            "a zip archive, not a PyTorch file; unzip it and pass the checkpoint inside")
    if start[8:10] == b'{"':          # safetensors: an 8-byte header length, then JSON (before the pickle test:
        # the length's first byte may be 0x80). torch.load reads it by its extension where safetensors is installed.
        if str(path).endswith(".safetensors") and importlib.util.find_spec("safetensors"):
            return None
        return "a safetensors file; re-save it with torch.save(safetensors.torch.load_file(PATH), NEW_PATH)"
    if start.startswith(b"\x80"):
        return None
    if start.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the weights; run git lfs pull in its repository"
    if start.startswith(b"\x1f\x8b"):
        return "gzip-compressed; decompress it (gunzip) and pass the file inside"
    if text.startswith(b"<"):
        return "an HTML page, not a checkpoint (a link that gave a web page?); download the file itself"
    if text.startswith((b"{", b"[")):
        return "a JSON file, not a checkpoint; pass the .pth or .ckpt file"
    words = start.decode("utf-8", "ignore")
    if b"\0" not in start and all(c.isprintable() or c.isspace() for c in words):
        return f"a text file, not a checkpoint (it begins {' '.join(words.split())[:40]!r})"
    return f"not a PyTorch file (it begins with the bytes {start[:8].hex(' ')})"


# ----------------------------------------------------------------------------------------------------
# Results records: JSON lines, Markdown rows

def append_whole(path, text):
    """Append `text` to `path` all or nothing: a write that fails (a full disk) cuts the file back to its
    length before, so that no half line is left for the next record to be glued onto. (os-level writes:
    a buffered file would try its failed write again when closed.) The file is locked meanwhile: runs that
    share a table never cut each other's rows."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)                  # released when the file is closed
        length = os.lseek(fd, 0, os.SEEK_END)
        data = text.encode()
        try:
            while data:
                data = data[os.write(fd, data):]    # a write may take only part of the bytes
        except BaseException:
            os.ftruncate(fd, length)
            raise
    finally:
        os.close(fd)


def append_jsonl(path, record):
    """Append one result as a JSON line: the files every script appends to (log.jsonl, eval.jsonl, ...)."""
    append_whole(path, json.dumps(record) + "\n")


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


def markdown_header(columns):
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


def markdown_row(result, columns):
    """One table row: '| cifar10 | HyDeS | resnet18 | 200 | 72.54 | ... |' (blank where not measured)."""
    def cell(value):
        return f"{value:.2f}" if isinstance(value, float) else ("" if value is None else str(value))
    return "| " + " | ".join(cell(result.get(c)) for c in columns) + " |"


def keep_results(result, json_path, rows, pictures=()):
    """Save what a script computed, most valuable first, so that a failure at output time never costs the
    work: each row (row, columns, table file or None) printed, then the result appended to json_path, each
    row to its table, each picture (path, draw: a function that writes it) drawn. A write that fails costs
    only itself: the rest are still written, then a one-line error names what was not saved and why."""
    for i, (row, columns, _) in enumerate(rows):
        print(("\n" if i else "") + markdown_header(columns))           # tables apart, by a blank line
        print(markdown_row(row, columns))
    lost = []
    writes = [(json_path, lambda: append_jsonl(json_path, result))]
    writes += [(table, lambda row=row, columns=columns, table=table: append_row(row, columns, table))
               for row, columns, table in rows if table]
    writes += pictures
    for path, write in writes:
        try:
            write()
        except (OSError, ValueError, RuntimeError) as error:   # a full disk, a path through a file, a picture that
            # cannot be drawn (torch's linear algebra on degenerate features); a bug in the code still shows
            lost.append(f"{path} ({str(error).splitlines()[0] if str(error) else type(error).__name__})")
    if lost:
        raise SystemExit(f"error: could not write {'; '.join(lost)}; the figures printed above are the result, "
                         f"and everything else was saved")


def append_row(result, columns, table):
    """Append one Markdown row to `table`, a file several runs share (its header written when new); a table
    whose header names other columns (written by an earlier version, or another script) is left alone."""
    header = markdown_header(columns)
    new = not os.path.exists(table) or os.path.getsize(table) == 0
    if not new:
        with open(table) as f:
            first = f.readline().rstrip("\n")
        if first != header.splitlines()[0]:
            raise ValueError(f"its columns are not these: {first[:80]}; pass another table file")
    append_whole(table, (header + "\n" if new else "") + markdown_row(result, columns) + "\n")
