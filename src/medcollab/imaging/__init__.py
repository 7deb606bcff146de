"""Imaging: DICOM studies stored encrypted beside their FHIR ImagingStudy, and shared."""
