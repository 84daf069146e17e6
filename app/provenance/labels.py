"""The IPTC "digital source type" label, written as XMP into every output image.

Marketplaces, ad platforms and the EU AI Act's machine-readable marking read this term:
``trainedAlgorithmicMedia`` for an image made from a prompt alone,
``compositeWithTrainedAlgorithmicMedia`` for an edit of an uploaded image. The XMP packet is
built with ElementTree (no XMP library without native dependencies is maintained for Python)
and read back with defusedxml, since ``POST /v1/verify`` parses images from anyone.
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from collections.abc import Mapping

from defusedxml import ElementTree as SafeET
from PIL import Image

IPTC_SOURCE_TYPES = "http://cv.iptc.org/newscodes/digitalsourcetype/"
GENERATED = IPTC_SOURCE_TYPES + "trainedAlgorithmicMedia"
EDITED = IPTC_SOURCE_TYPES + "compositeWithTrainedAlgorithmicMedia"

#: The key under which PNG keeps XMP in an iTXt chunk (XMP specification, part 3, 1.1.5).
PNG_XMP_KEY = "XML:com.adobe.xmp"

NAMESPACES = _NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "Iptc4xmpExt": "http://iptc.org/std/Iptc4xmpExt/2008-02-29/",
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "diffq": "https://github.com/diffq/diffq/ns/1.0/",  # the generation parameters in JPEG and WebP
}
for _prefix, _uri in _NS.items():
    ET.register_namespace(_prefix, _uri)


def source_type(edited: bool) -> str:
    """The IPTC term for an output: an edit of an input image, or made from a prompt alone."""
    return EDITED if edited else GENERATED


def xmp_packet(digital_source_type: str | None, creator_tool: str, properties: Mapping[str, str] | None = None) -> str:
    """An XMP packet with the digital source type (``None``: none), the generator's name and
    ``properties`` as ``diffq:<name>`` (names that are not XML names are left out)."""
    meta = ET.Element(f"{{{_NS['x']}}}xmpmeta")
    rdf = ET.SubElement(meta, f"{{{_NS['rdf']}}}RDF")
    attributes = {f"{{{_NS['rdf']}}}about": "", f"{{{_NS['xmp']}}}CreatorTool": creator_tool}
    if digital_source_type is not None:
        attributes[f"{{{_NS['Iptc4xmpExt']}}}DigitalSourceType"] = digital_source_type
    for name, value in sorted((properties or {}).items()):
        if name.isidentifier():
            attributes[f"{{{_NS['diffq']}}}{name}"] = value
    ET.SubElement(rdf, f"{{{_NS['rdf']}}}Description", attributes)
    body = ET.tostring(meta, encoding="unicode")
    return f'<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>{body}<?xpacket end="r"?>'


def read_xmp(image: Image.Image) -> str | None:
    """The XMP packet an opened image carries (PNG iTXt, or the JPEG/WebP XMP segment), if any."""
    raw = image.info.get(PNG_XMP_KEY) or image.info.get("xmp")
    if raw is None:
        return None
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def digital_source_type_of(xmp: str) -> str | None:
    """The ``Iptc4xmpExt:DigitalSourceType`` an XMP packet states (attribute or element form)."""
    start, end = xmp.find("<x:xmpmeta"), xmp.rfind("</x:xmpmeta>")
    if start < 0 or end < 0:
        start, end = xmp.find("<"), len(xmp) - len("</x:xmpmeta>")
    try:
        root = SafeET.fromstring(xmp[start : end + len("</x:xmpmeta>")])
    except Exception:  # noqa: BLE001 - a malformed packet carries no label
        return None
    name = f"{{{_NS['Iptc4xmpExt']}}}DigitalSourceType"
    for element in root.iter():
        if name in element.attrib:
            return element.attrib[name]
        if element.tag == name:
            text = (element.text or "").strip()
            resource = element.attrib.get(f"{{{_NS['rdf']}}}resource")
            return resource or text or None
    return None


def label_of(data: bytes) -> str | None:
    """The digital source type an encoded image states, or ``None``."""
    with Image.open(io.BytesIO(data)) as image:
        xmp = read_xmp(image)
    return digital_source_type_of(xmp) if xmp else None
