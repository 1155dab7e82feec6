"""The OME-XML description of a stitched RGB slide (OME schema 2016-06).

Built with ElementTree so names with XML-special characters (&, <, quotes) are escaped.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"


def ome_xml(*, name: str, width: int, height: int, mpp: float, description: str,
            annotations: dict[str, str]) -> str:
    """One interleaved RGB uint8 image whose reduced levels are in SubIFDs of IFD 0."""
    ET.register_namespace("", NS)
    ome = ET.Element(f"{{{NS}}}OME", {"Creator": "stainctl"})
    image = ET.SubElement(ome, f"{{{NS}}}Image", {"ID": "Image:0", "Name": name})
    ET.SubElement(image, f"{{{NS}}}Description").text = description
    size = f"{mpp:.6g}"
    pixels = ET.SubElement(image, f"{{{NS}}}Pixels", {
        "ID": "Pixels:0", "DimensionOrder": "XYCZT", "Type": "uint8", "Interleaved": "true",
        "SizeX": str(width), "SizeY": str(height), "SizeC": "3", "SizeZ": "1", "SizeT": "1",
        "PhysicalSizeX": size, "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": size, "PhysicalSizeYUnit": "µm",
    })
    ET.SubElement(pixels, f"{{{NS}}}Channel", {"ID": "Channel:0:0", "SamplesPerPixel": "3"})
    ET.SubElement(pixels, f"{{{NS}}}TiffData", {"IFD": "0", "PlaneCount": "1"})
    ET.SubElement(image, f"{{{NS}}}AnnotationRef", {"ID": "Annotation:0"})
    sa = ET.SubElement(ome, f"{{{NS}}}StructuredAnnotations")
    ann = ET.SubElement(sa, f"{{{NS}}}MapAnnotation", {
        "ID": "Annotation:0", "Namespace": "stainctl"})
    value = ET.SubElement(ann, f"{{{NS}}}Value")
    for key, text in annotations.items():
        ET.SubElement(value, f"{{{NS}}}M", {"K": key}).text = text
    body = ET.tostring(ome, encoding="unicode")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + body
