"""Image files read as the 8-bit RGB pictures they show: every mode PIL opens, scaled by its bit depth,
turned as its EXIF orientation says, or refused by name; and the files of a class-folder tree listed
once each, however its symbolic links loop.

Machinery: a reader of the method may skip this file; what it gives is `Image.open(path).convert("RGB")`
for the common case. The uncommon ones are why it exists: PIL's convert("RGB") clips a 16-bit image's
values to 255 instead of scaling them (a 16-bit greyscale PNG comes out almost white), and the pixels of
a JPEG from a camera are stored unrotated, with the way to hold it in an EXIF tag that every image viewer
applies. The datasets (data.py) read every file through `read_rgb`.

    mode                          what read_rgb makes of it
    1, L, P, RGB, CMYK, YCbCr     PIL's convert("RGB")
    LA, PA, RGBA, RGBa, La, RGBX  the same: the alpha channel is dropped, the colours kept as they are
                                  (not composited on a background)
    I;16, I;16L, I;16B, I;16N     16-bit: each value v -> round(v / 257), 65535 -> 255, then greyscale RGB
    I                             32-bit integers: as 16-bit when every value lies in 0 ... 65535 (16-bit
                                  PGM and TIFF files open so), otherwise refused
    F                             32-bit floats: refused (no fixed range: 0-1 and 0-255 are both common)
    anything else                 PIL's convert("RGB"), refused by name where PIL cannot convert it
"""

import os

import numpy as np
from PIL import Image, ImageFile, ImageOps

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
# EXIF orientations that turn the picture a quarter (5 to 8): its width and height swap once applied
QUARTER_TURNS = (5, 6, 7, 8)
ORIENTATION_TAG = 0x0112


def readable_extensions():
    """The file extensions of every format PIL decodes by itself (.jpg, .png, .gif, .webp, .tif, ...): the
    formats it opens, less its stubs (BUFR, GRIB, HDF5, WMF), MPEG, which it only identifies, and EPS, which
    it hands to Ghostscript, an outside program."""
    Image.init()
    return tuple(sorted(extension for extension, name in Image.registered_extensions().items()
                        if name in Image.OPEN and name not in ("MPEG", "EPS")
                        and not (isinstance(Image.OPEN[name][0], type)
                                 and issubclass(Image.OPEN[name][0], ImageFile.StubImageFile))))


IMAGE_EXTENSIONS = readable_extensions()


class DatasetError(RuntimeError):
    """A dataset (or a results file) that cannot be found or read; the message says what to do."""


TRAINING_REMEDY = "(train.py --skip-bad-images leaves such files out of training and of its monitor)"


def read_rgb(path, orient=True, remedy=TRAINING_REMEDY):
    """An image file as an 8-bit RGB PIL image, as the table above says; orient: apply its EXIF
    orientation (segment.py does not: VOC's masks are aligned with the stored pixels); remedy: the end of
    the error's message, what else the user can do.

    The whole file is decoded here, so a truncated or corrupt image fails with its name, rather than as a
    traceback from inside a DataLoader worker."""
    try:
        with Image.open(path) as img:
            img.load()
            if orient:
                img = ImageOps.exif_transpose(img)
            return to_rgb(img, path)
    except (OSError, ValueError, Image.DecompressionBombError) as error:  # UnidentifiedImageError is an OSError
        raise DatasetError(f"cannot read image {path} ({str(error).splitlines()[0]}); delete or replace the file "
                           f"{remedy}") from None


def to_rgb(img, path):
    """A decoded PIL image of any mode -> 8-bit RGB, scaled by its bit depth (ValueError if it cannot be)."""
    if img.mode == "F":
        raise ValueError("32-bit floating-point pixels have no fixed range; save the image in 8 or 16 bits")
    if img.mode in SIXTEEN_BIT or img.mode == "I":
        values = np.asarray(img).astype(np.int64)                   # (H, W), whatever the byte order
        if img.mode == "I" and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"32-bit integer pixels from {values.min()} to {values.max()}, no 8- or 16-bit "
                             f"range; save the image in 8 or 16 bits")
        eight_bit = ((values + 128) // 257).astype(np.uint8)         # round(v / 257): 65535 -> 255, 128 -> 0
        return Image.fromarray(eight_bit).convert("RGB")                # (H, W) uint8: mode L
    return img.convert("RGB")


def image_size(path):
    """(width, height) of the picture read_rgb makes of the file, from its header alone (no pixels)."""
    with Image.open(path) as img:
        width, height = img.size
        if img.getexif().get(ORIENTATION_TAG) in QUARTER_TURNS:
            width, height = height, width
        return width, height


def broken_links(directory):
    """The entries of `directory` that are symbolic links to nothing: a class folder linked from a disk
    that is gone, which torchvision's ImageFolder would drop without a word."""
    return sorted(entry.path for entry in os.scandir(directory)
                  if entry.is_symlink() and not os.path.exists(entry.path))


def files_in_class_folders(directory, class_to_idx, extensions=IMAGE_EXTENSIONS):
    """[(path, class index)] of the files with `extensions` under directory/<class>/, symbolic links
    followed (a class folder linked from elsewhere is common), sorted, each real folder once. The other
    files are left out, and named in a note.

    torchvision's ImageFolder walks with os.walk(followlinks=True), which never notices a loop: a link
    inside train/a back to train/ lists train/b's images again under class a, nested until the path is
    too long (8 images became 328), and two such links take exponential time. Here a folder is skipped,
    with a note, when it was listed already, is another class's folder, or holds the whole tree (the
    dataset's folder or one above it)."""
    top = os.path.realpath(directory)
    class_folders = {os.path.realpath(os.path.join(directory, c)) for c in class_to_idx}
    listed, skipped, samples, others = set(), [], [], []
    for name, index in sorted(class_to_idx.items()):
        start = os.path.join(directory, name)
        for folder, subfolders, files in os.walk(start, followlinks=True):
            real = os.path.realpath(folder)
            holds_the_tree = real == top or top.startswith(real + os.sep)
            if real in listed or holds_the_tree or (folder != start and real in class_folders):
                skipped.append(folder)
                subfolders[:] = []                        # os.walk descends into what is left in the list
                continue
            listed.add(real)
            subfolders.sort()
            for file in sorted(files):
                path = os.path.join(folder, file)
                if file.lower().endswith(extensions):
                    samples.append((path, index))
                else:
                    others.append(path)
    if (skipped or others) and directory not in _NOTED:
        _NOTED.add(directory)
        if skipped:
            print(f"note: {directory} has {len(skipped)} symbolic link(s) back into itself, e.g. {skipped[0]}; "
                  f"their folders are listed once")
        if others:
            print(f"note: {directory} holds {len(others)} file(s) that are not images PIL reads, left out: "
                  f"{', '.join(others[:3])}{', ...' if len(others) > 3 else ''}")
    present = {index for _, index in samples}
    empty = sorted(name for name, index in class_to_idx.items() if index not in present)
    if empty:
        raise FileNotFoundError(f"the class folder {os.path.join(directory, empty[0])} holds no image file "
                                f"({len(empty)} such folder(s); .jpg, .png, .gif and PIL's other formats are "
                                f"read); add images or remove the folder")
    return samples


_NOTED = set()       # the trees already noted, so that each is noted once per process
