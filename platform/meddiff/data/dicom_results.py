"""Anomaly-detection results as DICOM objects a viewer and a PACS take: a binary Segmentation
(DICOM SEG) of the lesion mask and a Parametric Map of the float anomaly map, both made with
highdicom from the source series.

Both are new instances (new SOP Instance and Series Instance UIDs, in the source's study) that
reference the source series: highdicom copies the patient and study module attributes the
standard requires (PS3.3 A.51, A.75: the Patient, General Study and Frame of Reference modules
must be those of the source images), fills the Referenced Series Sequence and each frame's
Derivation Image / Source Image Sequence, and takes each frame's plane position and orientation
from its source frame. Nothing else of the patient's is copied, and meddiff's own logs and
tracking never see these attributes.

Codes: the segment is SNOMED CT "Morphologically abnormal structure" (49755003) / "Lesion"
(52988006), algorithm family DICOM CID 7162 "Artificial Intelligence"; the map's unit is UCUM
"{ratio}"-free "no units" ("1"), values in [0, 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ALGORITHM = "meddiff THOR"
MANUFACTURER = "meddiff"
SEG_SERIES_NUMBER = 901
MAP_SERIES_NUMBER = 902


@dataclass(frozen=True)
class Algorithm:
    """What made the result: written into both objects (Algorithm Identification Sequence,
    Software Versions, Content Description)."""

    model: str  # model reference or name, e.g. "models:/thor-ddpm/1" or "brain-tiny"
    version: str  # model version and meddiff version, e.g. "1 (meddiff 0.1.0)"
    threshold: float  # map value above which a voxel is in the SEG
    description: str = "THOR anomaly map"


def segmentation(sources: Sequence[Any], mask: np.ndarray, algorithm: Algorithm) -> Any:
    """A binary DICOM SEG (highdicom ``Segmentation``) of ``mask`` over ``sources``.

    ``mask`` bool (frames, rows, columns), one frame per source frame in the sources' order
    (:meth:`meddiff.data.dicom.DicomSeries.to_frames`). Empty frames are omitted, as highdicom
    does by default; a mask without any voxel keeps one empty frame (a SEG needs one).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="anomaly",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm_identification(algorithm),
    )
    return hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=np.asarray(mask, dtype=bool).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=ALGORITHM,
        software_versions=algorithm.version,
        device_serial_number="none",
        content_description=f"anomaly map > {algorithm.threshold:.4g}"[:64],
        content_label="ANOMALY",
        omit_empty_frames=bool(np.any(mask)),
    )


def parametric_map(sources: Sequence[Any], values: np.ndarray, algorithm: Algorithm) -> Any:
    """A DICOM Parametric Map (highdicom ``ParametricMap``) of float32 ``values`` (frames, rows,
    columns) in [0, 1], one frame per source frame in the sources' order; windowed 0..1 for
    display."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    mapping = hd.pm.RealWorldValueMapping(
        lut_label="anomaly",
        lut_explanation=algorithm.description[:64],
        unit=codes.UCUM.NoUnits,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
    )
    return hd.pm.ParametricMap(
        source_images=list(sources),
        pixel_array=np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0),
        series_instance_uid=hd.UID(),
        series_number=MAP_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=ALGORITHM,
        software_versions=algorithm.version,
        device_serial_number="none",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="ANOMALYMAP",
        content_description=algorithm.description[:64],
    )


def _algorithm_identification(algorithm: Algorithm) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(
        name=ALGORITHM,
        version=algorithm.version[:64],
        family=codes.cid7162.ArtificialIntelligence,
        parameters={"model": algorithm.model[:64], "threshold": f"{algorithm.threshold:.6g}"},
    )


def seg_mask(seg: Any, source_uids: Sequence[str]) -> np.ndarray:
    """Segment 1 of a SEG (a dataset, e.g. read back from a PACS) as bool (n, rows, columns),
    one frame per single-frame source instance in ``source_uids`` order; omitted frames are 0."""
    import highdicom as hd

    if not isinstance(seg, hd.seg.Segmentation):
        seg = hd.seg.Segmentation.from_dataset(seg)
    pixels = seg.get_pixels_by_source_instance(
        list(source_uids), segment_numbers=[1], assert_missing_frames_are_empty=True
    )
    return pixels[..., 0].astype(bool)
