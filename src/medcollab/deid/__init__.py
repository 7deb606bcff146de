"""De-identification: turning records and images into copies that identify nobody.

Used when data leaves the care relationship (research, teaching, a second opinion outside the
care team). Each module is pure, with no database or network, so the sharing flows, the API and
the CLI apply the same rules:

* :mod:`medcollab.deid.dicom_profile` — DICOM PS3.15 Table E.1-1 (Basic Application Level
  Confidentiality Profile) as data;
* :mod:`medcollab.deid.dicom` — DICOM header de-identification with consistent UID remapping,
  date removal or shifting, and burned-in annotation flagging.

See ``docs/security/deidentification.md``.
"""
