"""Reading and writing images: modes, alpha, bit depth, metadata, stdin/stdout and atomic writes.

The package's files: `image.py` (the image model, the format table, arrays and planes), `decode.py`
(reading), `metadata.py` (ICC/EXIF/XMP/text in and out), `encode.py` (bytes of each format), `write.py`
(files and streams; the atomic write itself is `upscale/files.py`).

Reading (:func:`read_image`) turns a file, raw bytes (stdin) or a binary stream into a :class:`LoadedImage`:
colour as H x W x 3 float32 in [0, 1] (grey replicated into three channels), a separate straight (not
premultiplied) alpha plane, and the metadata worth keeping (ICC profile, EXIF, XMP, PNG text). The EXIF
orientation is applied to the pixels first and reset to 1 in the EXIF and XMP kept. Every problem is an
:class:`ImageError` whose one-line message starts with the file name.

Input modes: 1, L, LA, P, PA (palette, with or without transparency), RGB (with or without a tRNS colour
key), RGBA, RGBX, RGBa/La (premultiplied, un-premultiplied by Pillow), YCbCr, CMYK (converted to sRGB through
its ICC profile when it has one), I;16 (16-bit grey), I (32-bit integers: accepted when the values fit in
0..65535, read as 16-bit grey), F (32-bit float: accepted when the values lie in 0..1, 0..255 or 0..65535,
read as 16-bit grey). Other modes (LAB, HSV, ...) are refused with a message naming the mode.

16-bit images: Pillow has no 16-bit RGB or RGBA mode (it truncates such PNG and TIFF files to 8 bits), so
16-bit PNG and TIFF files are decoded with `imagecodecs` (libpng and libtiff, from the author of tifffile,
binary wheels; the one dependency that covers 16-bit PNG *and* TIFF), and 16-bit PNGs are encoded with it
(the metadata chunks are added here, as its encoder writes none). 16-bit TIFFs are written here: plain
uncompressed strips behind an IFD that Pillow's TIFF directory code lays out, so the EXIF, GPS, ICC and XMP
tags come along. Pillow still parses all metadata and does everything else. A 16-bit input keeps 16 bits
through the float pipeline and is written with 16 bits where the format allows it (PNG, TIFF); JPEG, WebP
and BMP get 8 bits. A value ``x`` in [0, 1] is stored as ``round(x * 65535)`` in 16 bits; 8-bit output
uses :func:`upscale.metrics.to_uint8` (round half to even), the rounding of the evaluation protocol.

What each output format carries (``provenance`` is the dict given to :func:`save_image`, e.g. model,
scale, tile, precision, version):

======  =======================================================================================
PNG     RGB/RGBA/L/LA, 8 or 16 bits; iCCP; eXIf; iTXt ``XML:com.adobe.xmp``; the source's text
        chunks; provenance as text chunks ``Software`` and ``upscale:<key>`` and in the XMP.
JPEG    RGB/L, 8 bits, quality 95 and 4:4:4 chroma by default; ICC; EXIF (``Software`` holds the
        provenance); XMP; a COM comment (the source's ``Comment``, else the provenance). EXIF and XMP
        must each fit one 64 KB segment: a larger maker note / XMP packet is left out. JPEG has no
        alpha: a transparent image is composited over **white** (what it shows in most viewers and
        documents; dropping alpha instead would reveal the arbitrary colour of hidden pixels).
WebP    RGB/RGBA (grey is stored as RGB), 8 bits, quality 95; ICC; EXIF; XMP.
TIFF    RGB/RGBA/L/LA, 8 or 16 bits, uncompressed; ICC; EXIF tags (IFD0, Exif and GPS IFDs);
        XMP (tag 700); ``Software`` holds the provenance.
BMP     RGB/L, 8 bits, no metadata; alpha composited over white as for JPEG (Pillow's BMP
        reader, like many others, ignores a BMP alpha channel).
AVIF    RGB/RGBA, 8 bits, quality 95 (Pillow's own codec); ICC; EXIF; XMP. An image of more than 8
        bits is written with 10 (libavif through imagecodecs, which writes no metadata: the ICC profile,
        EXIF and XMP items are added to its file here); 10/12-bit files are read at their depth.
HEIF    (.heic) RGB/RGBA, 8 bits, or 10 when the image has more than 8 (pillow-heif: libheif, x265),
        quality 95; ICC; EXIF; XMP. 10/12-bit files are read at their depth.
JXL     RGB/RGBA, 8 bits, quality 95 (pillow-jxl-plugin: libjxl); ICC (a standard colour space is
        stored as a code: reading gives back an equal profile, not the same bytes); EXIF; XMP. An image
        of more than 8 bits is written with 16 (libjxl through imagecodecs, in a container we write with
        the EXIF and XMP boxes), unless it has an ICC profile other than sRGB: that encoder writes sRGB,
        so the profile wins and 8 bits are written. Files of more than 8 bits are read at 16.
GIF     a palette per frame (median cut, Floyd-Steinberg dithering), 1-bit transparency (alpha
        under one half); the source's comment, else the provenance, as a comment.
======  =======================================================================================

Several frames: an animated GIF, APNG or animated WebP, or a multi-page TIFF is read whole
(:attr:`LoadedImage.pages` holds the frames after the first, each as a viewer shows it, with its
``duration``; ``loop`` on the first) and written as an animation again (GIF, APNG, WebP: 8 bits, each frame
whole and replacing the last) or as pages (TIFF: each page its own size, depth and metadata). Formats that
hold one image refuse several frames (the command line keeps the first, and says so).

HEIF and JPEG XL come from plug-in packages (`plugins()` registers them once); where one is missing (no
wheel for the platform), reading or writing that format is one error line naming the package to install.
Deeper than 8 bits, every format is one LoadedImage of ``bit_depth=16`` (10 and 12 bits scaled to 16).

Writing (:func:`save_image`) is atomic: the encoded bytes go to a temporary file in the target folder, are
flushed and fsynced, and the file is moved into place (``os.replace``, or a hard link that cannot clobber
a file created meanwhile when overwriting is not allowed). On any error the temporary file is removed and an
:class:`ImageError` names the destination. A destination that is one of the ``protect`` paths (the inputs) is
refused even with ``overwrite``. ``dest="-"`` or a binary stream gets the bytes directly
(:func:`encode_image` makes them).

Decompression bombs: an image with more pixels than Pillow's ``Image.MAX_IMAGE_PIXELS`` (or the limit set
with :func:`set_max_pixels`) is refused unless ``allow_large=True`` (the CLI's ``--allow-large``; such errors are a :class:`TooLargeError`).
"""

from .decode import max_pixels, read_image, set_max_pixels
from .encode import PNG_COMPRESS_LEVEL, encode_image, output_bits
from .image import (
    EXTENSIONS,
    FORMATS,
    KEEP_KIND,
    MULTI_FRAME_FORMATS,
    READ_EXTENSIONS,
    SIXTEEN_BIT_FORMATS,
    ImageError,
    LoadedImage,
    TooLargeError,
    array_planes,
    format_by_magic,
    format_for,
    format_support,
    pillow_planes,
    quantise,
    unit_floats,
)
from .write import save_image

__all__ = [
    "EXTENSIONS", "FORMATS", "KEEP_KIND", "MULTI_FRAME_FORMATS", "PNG_COMPRESS_LEVEL", "READ_EXTENSIONS", "SIXTEEN_BIT_FORMATS", "ImageError", "LoadedImage", "TooLargeError",
    "array_planes", "encode_image", "format_by_magic", "format_for", "format_support", "max_pixels", "output_bits", "pillow_planes", "quantise",
    "read_image", "save_image", "set_max_pixels", "unit_floats",
]
