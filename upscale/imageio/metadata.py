"""Metadata in and out: ICC, EXIF (cleaned of the source's layout tags), XMP, PNG text, and the provenance
recorded in each output."""

from __future__ import annotations

import re
from typing import Any, Mapping
from xml.sax.saxutils import quoteattr

from PIL import Image

from .. import __version__

# Tags of a TIFF file's IFD0 that describe the pixel layout of *that* file: never carried to an output.
_LAYOUT_TAGS = frozenset({
    254, 255, 256, 257, 258, 259, 262, 263, 264, 265, 266, 273, 277, 278, 279, 280, 281, 284, 288, 289, 290, 291,
    292, 293, 317, 318, 319, 320, 321, 322, 323, 324, 325, 330, 332, 338, 339, 340, 341, 347, 512, 513, 514, 515,
    517, 518, 519, 520, 521, 529, 530, 531, 532, 700, 34377, 34675, 37724,
})


_EXIF_IFD, _GPS_IFD, _INTEROP_IFD = 0x8769, 0x8825, 0xA005


_ORIENTATION, _SOFTWARE = 0x0112, 0x0131


def _pillow_metadata(im: Image.Image) -> dict[str, Any]:
    """icc_profile, exif, xmp, text and the orientation of a loaded Pillow image."""
    try:
        exif = im.getexif()
    except Exception:  # noqa: BLE001 - corrupt EXIF never stops an image from being read
        exif = Image.Exif()
    meta = _exif_metadata(exif)
    if im.format == "TIFF":  # this page's own tags: Pillow's `info` keeps a profile or XMP of a page it read before
        tags = getattr(im, "tag_v2", {})
        icc, xmp = tags.get(34675), tags.get(700)
    else:
        icc, xmp = im.info.get("icc_profile"), im.info.get("xmp") or im.info.get("XML:com.adobe.xmp")
    meta["icc_profile"] = bytes(icc) if icc else None
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    # XMP's tiff:Orientation counts only for PNG, as in Pillow (Pillow's TIFF loader has already turned the
    # pixels upright by the EXIF tag, and a JPEG's XMP merely mirrors its EXIF)
    meta.update(_xmp_metadata(bytes(xmp) if xmp else None, meta, orient=im.format == "PNG"))
    text: dict[str, str] = {}
    if im.format == "PNG":
        for key, value in getattr(im, "text", {}).items():
            if key == "XML:com.adobe.xmp" or (key.startswith("Raw profile type") and key[17:] in ("exif", "xmp")):
                continue  # carried as EXIF / XMP instead
            text[key] = str(value)
    elif im.info.get("comment"):
        comment = im.info["comment"]
        text["Comment"] = comment.decode("utf-8", "replace") if isinstance(comment, bytes) else str(comment)
    meta["text"] = text
    return meta


def _exif_metadata(exif: Image.Exif) -> dict[str, Any]:
    """{"exif": cleaned bytes or None, "orientation": int} from a Pillow Exif (of any source format)."""
    orientation = exif.get(_ORIENTATION, 1)
    orientation = orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1
    return {"exif": _clean_exif(exif), "orientation": orientation}


def _clean_exif(src: Image.Exif) -> bytes | None:
    """EXIF without the source file's layout tags and thumbnail, Orientation reset to 1; None when empty."""
    try:
        out = Image.Exif()
        out.endian = "<"
        useful = False
        for tag, value in src.items():
            if tag in _LAYOUT_TAGS or tag in (_EXIF_IFD, _GPS_IFD, _INTEROP_IFD):
                continue
            out[tag] = value
            useful = useful or tag != _ORIENTATION
        for pointer in (_EXIF_IFD, _GPS_IFD):
            try:
                sub = dict(src.get_ifd(pointer))
            except Exception:  # noqa: BLE001 - a broken sub-IFD is dropped, the rest kept
                sub = {}
            if pointer == _EXIF_IFD and _INTEROP_IFD in sub:
                interop = sub.pop(_INTEROP_IFD)
                if not isinstance(interop, dict):
                    try:
                        interop = dict(src.get_ifd(_INTEROP_IFD))
                    except Exception:  # noqa: BLE001
                        interop = {}
                if interop:
                    sub[_INTEROP_IFD] = interop
            if sub:
                out.get_ifd(pointer).update(sub)
                useful = True
        if _ORIENTATION in out:
            out[_ORIENTATION] = 1
        return _exif_bytes(out) if useful else None
    except Exception:  # noqa: BLE001 - EXIF Pillow cannot re-encode is dropped rather than failing the read
        return None


def _exif_bytes(exif: Image.Exif) -> bytes | None:
    """``exif.tobytes()``, leaving out the entries Pillow cannot write (odd types in camera files)."""
    try:
        return exif.tobytes()
    except Exception:  # noqa: BLE001
        pass

    def writable(tag: int, value: Any, pointer: int | None) -> bool:
        probe = Image.Exif()
        probe.endian = exif.endian
        if pointer is None:
            probe[tag] = value
        else:
            probe.get_ifd(pointer)[tag] = value
        try:
            probe.tobytes()
            return True
        except Exception:  # noqa: BLE001
            return False

    for tag in list(exif):
        if tag not in (_EXIF_IFD, _GPS_IFD) and not writable(tag, exif[tag], None):
            del exif[tag]
    for pointer in (_EXIF_IFD, _GPS_IFD):
        sub = exif.get_ifd(pointer)
        for tag in list(sub):
            if not writable(tag, sub[tag], pointer):
                del sub[tag]
    try:
        return exif.tobytes()
    except Exception:  # noqa: BLE001
        return None


_XMP_RE_CACHE: dict[str, tuple[re.Pattern, re.Pattern]] = {}


def _xmp_patterns(prop: str) -> tuple[re.Pattern, re.Pattern]:
    if prop not in _XMP_RE_CACHE:
        p = re.escape(prop)
        _XMP_RE_CACHE[prop] = (re.compile(rf"(\s{p}\s*=\s*)([\"'])(.*?)\2", re.S),
                               re.compile(rf"(<{p}>)(.*?)(</{p}>)", re.S))
    return _XMP_RE_CACHE[prop]


def _xmp_get(text: str, prop: str) -> str | None:
    attr, elem = _xmp_patterns(prop)
    m = attr.search(text)
    if m:
        return m.group(3)
    m = elem.search(text)
    return m.group(2) if m else None


def _xmp_set(text: str, prop: str, value: str) -> str:
    """Replace the value of an XMP property where it is present (attribute or element form)."""
    attr, elem = _xmp_patterns(prop)
    text = attr.sub(lambda m: f"{m.group(1)}{m.group(2)}{value}{m.group(2)}", text)
    return elem.sub(lambda m: f"{m.group(1)}{value}{m.group(3)}", text)


def _xmp_metadata(xmp: bytes | None, meta: dict[str, Any], orient: bool = True) -> dict[str, Any]:
    """{"xmp": bytes with tiff:Orientation reset to 1} and the orientation from XMP when EXIF has none."""
    if not xmp:
        return {"xmp": None}
    try:
        text = xmp.decode("utf-8")
    except UnicodeDecodeError:
        return {"xmp": xmp}
    found = _xmp_get(text, "tiff:Orientation")
    result: dict[str, Any] = {}
    if found is not None:
        if orient and meta.get("orientation", 1) == 1 and found.strip() in tuple("2345678"):
            result["orientation"] = int(found.strip())
        text = _xmp_set(text, "tiff:Orientation", "1")
    result["xmp"] = text.encode("utf-8")
    return result


def _provenance(provenance: Mapping[str, Any] | None) -> tuple[str, list[tuple[str, str]]] | None:
    """(Software string, [(key, value)]) from a provenance dict; keys lose a leading ``upscale:``."""
    if not provenance:
        return None
    software = str(provenance.get("Software") or f"upscale {__version__}")
    items = [(k[len("upscale:"):] if k.startswith("upscale:") else k, str(v))
             for k, v in provenance.items() if k != "Software" and v is not None]
    return software, items


def _software_line(prov: tuple[str, list[tuple[str, str]]]) -> str:
    software, items = prov
    return f"{software} ({'; '.join(f'{k}={v}' for k, v in items)})" if items else software


_UPSCALE_NS = "https://github.com/upscale/upscale/ns/provenance/1.0/"


_XMP_HEAD = '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n<x:xmpmeta xmlns:x="adobe:ns:meta/">\n' \
            ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'


_XMP_TAIL = ' </rdf:RDF>\n</x:xmpmeta>\n<?xpacket end="w"?>'


def _xmp_name(key: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
    return name if re.match(r"[A-Za-z_]", name) else f"_{name}"


def _xmp_out(xmp: bytes | None, prov, size: tuple[int, int]) -> bytes | None:
    """The source XMP with stale sizes updated and a provenance description added (or a new packet)."""
    text = None
    if xmp:
        try:
            text = xmp.decode("utf-8")
        except UnicodeDecodeError:
            return xmp if prov is None else None
        for prop, value in (("tiff:ImageWidth", size[0]), ("tiff:ImageLength", size[1]),
                            ("exif:PixelXDimension", size[0]), ("exif:PixelYDimension", size[1])):
            text = _xmp_set(text, prop, str(value))
    if prov is None:
        return text.encode("utf-8") if text is not None else None
    software, items = prov
    attrs = "".join(f"\n    upscale:{_xmp_name(k)}={quoteattr(v)}" for k, v in items)
    block = (f'  <rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" '
             f'xmlns:upscale="{_UPSCALE_NS}"\n    xmp:CreatorTool={quoteattr(software)}{attrs}/>\n')
    if text is None:
        return (_XMP_HEAD + block + _XMP_TAIL).encode("utf-8")
    # drop an older provenance block and CreatorTool: both are replaced by this run's
    text = re.sub(rf'\s*<rdf:Description[^>]*xmlns:upscale="{re.escape(_UPSCALE_NS)}"[^>]*/>', "", text, flags=re.S)
    text = re.sub(r'\sxmp:CreatorTool\s*=\s*(["\']).*?\1', "", text, flags=re.S)
    text = re.sub(r"<xmp:CreatorTool>.*?</xmp:CreatorTool>", "", text, flags=re.S)
    end = text.rfind("</rdf:RDF>")
    if end < 0:
        return (_XMP_HEAD + block + _XMP_TAIL).encode("utf-8")
    return (text[:end] + block + text[end:]).encode("utf-8")


def _exif_out(exif: bytes | None, software: str | None, size: tuple[int, int], create: bool) -> Image.Exif | None:
    """The EXIF to write: orientation 1, pixel dimensions updated, Software set (created only if `create`)."""
    out = Image.Exif()
    if exif:
        try:
            out.load(exif)
        except Exception:  # noqa: BLE001
            out = Image.Exif()
            exif = None
    if not exif and not (create and software):
        return None
    if out.endian is None:
        out.endian = "<"  # little-endian ("II") like most writers
    if _ORIENTATION in out:
        out[_ORIENTATION] = 1
    if software:
        out[_SOFTWARE] = software
    if exif and _EXIF_IFD in out:
        sub = out.get_ifd(_EXIF_IFD)
        if 0xA002 in sub:
            sub[0xA002] = size[0]
        if 0xA003 in sub:
            sub[0xA003] = size[1]
    return out


def _icc_fits(icc: bytes | None, grey: bool) -> bytes | None:
    """The ICC profile if its colour space matches the output's (GRAY for grey, RGB for colour)."""
    if not icc or len(icc) < 128:
        return None
    space = icc[16:20]
    return icc if space == (b"GRAY" if grey else b"RGB ") else None


def _png_key_ok(key: str) -> bool:
    try:
        key.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return 0 < len(key) < 80 and key == key.strip() and "\x00" not in key


_PNG_KEYWORDS = frozenset({"Title", "Author", "Description", "Copyright", "Creation Time", "Software", "Disclaimer",
                           "Warning", "Source", "Comment"})


def _png_text(text: Mapping[str, str], prov) -> dict[str, str]:
    out = {k: str(v) for k, v in text.items() if _png_key_ok(k)}
    if prov is not None:
        for k in [k for k in out if k.startswith("upscale:")]:
            del out[k]
        software, items = prov
        out["Software"] = software
        for k, v in items:
            key = k if (":" in k or k in _PNG_KEYWORDS) else f"upscale:{k}"
            if _png_key_ok(key):
                out[key] = v
    return out
