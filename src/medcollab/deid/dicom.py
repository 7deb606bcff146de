"""DICOM header de-identification: PS3.15 Basic Application Level Confidentiality Profile.

Pure functions over bytes, with no database and no network, so the HTTP upload, the sharing flow
and the CLI use the same code:

* :func:`sniff_dicom` / :func:`parse_dicom` accept only a DICOM Part 10 file (128-byte preamble,
  ``DICM``, file meta information) and raise :class:`InvalidDicom` for anything else, such as a
  PDF or an executable renamed to ``.dcm``;
* :func:`extract_metadata` gives the fields an ImagingStudy needs;
* :class:`DicomDeidentifier` (or the :func:`deidentify` shortcut) applies Table E.1-1
  (:mod:`medcollab.deid.dicom_profile`) to every attribute, recursively through sequences:

  - instance UIDs (U) are replaced by ``2.25.<n>`` where ``n`` comes from HMAC-SHA256 under a
    per-recipient key, so the same original UID always maps to the same new UID for that key
    (study, series and frame-of-reference relations survive across files and uploads) without a
    stored mapping table, and nobody without the key can link the new UID to the original;
  - dates are removed or replaced by dummies (``LongitudinalTemporalInformationModified`` =
    REMOVED), or, with ``date_shift_days``, every date the Retain Longitudinal Temporal
    Information with Modified Dates option lists is shifted by that fixed number of days
    (MODIFIED), which keeps intervals between a patient's studies;
  - names and identifiers are zeroed or replaced with dummies, all private attributes, the curve
    and overlay groups and retired group lengths are removed, and the file meta information is
    rebuilt around the new SOP Instance UID, with a zeroed preamble;
  - ``PatientIdentityRemoved`` is YES and ``DeidentificationMethod`` plus its code sequence name
    the profile and option used;
  - pixel data is never touched: whether pixels carry burned-in text is assessed
    (:func:`assess_burned_in`) and reported in :class:`DeidResult`, and the caller decides
    whether such an image may be released.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import re
import struct
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Final, TypedDict

import pydicom.config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import dcmread
from pydicom.filewriter import dcmwrite
from pydicom.multival import MultiValue
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from medcollab.deid.dicom_profile import (
    BASIC_PROFILE,
    PROFILE_EDITION,
    STRICTER_THAN_PROFILE,
    Action,
    is_private,
    repeating_group_action,
    resolve_action,
)
from medcollab.errors import InvalidInput, PayloadTooLarge

# pydicom's value validation warnings quote the offending value, which may be a patient's name or
# identifier, and Python prints warnings to stderr, i.e. into the server log. This module is the
# only one that imports pydicom, and de-identification rewrites identifying values anyway, so the
# validation is switched off for the process instead of per call (warnings.catch_warnings is not
# thread-safe on Python 3.11).
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

#: The largest upload accepted by default (a multi-frame study instance can be hundreds of MiB).
DEFAULT_MAX_BYTES: Final = 512 * 1024 * 1024
#: Root of the generated UIDs: the UUID-derived arc of ISO/IEC 9834-8, which needs no registration.
DEFAULT_UID_ROOT: Final = "2.25."
#: A shorter key would let someone who can guess original UIDs test guesses cheaply.
MIN_KEY_BYTES: Final = 16

_PREAMBLE_END: Final = 128
_MAGIC: Final = b"DICM"
_MEDIA_STORAGE_DIRECTORY: Final = "1.2.840.10008.1.3.10"
_DEFLATED: Final = b"1.2.840.10008.1.2.1.99"
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_LENGTH_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UID_PATTERN: Final = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_ROOT_PATTERN: Final = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.")
_DT_PATTERN: Final = re.compile(r"(\d{8})(\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?([+-]\d{4})?")
_UID_CONTEXT: Final = b"medcollab/deid/dicom-uid/v1\x00"
_DATE_SHIFT_CONTEXT: Final = b"medcollab/deid/date-shift/v1\x00"

# What pydicom raises for input it cannot parse. Listed rather than caught as Exception so a bug
# in our own code is not reported to the uploader as a bad file.
_PARSE_ERRORS: Final = (
    InvalidDicomError,
    EOFError,
    ValueError,
    TypeError,
    LookupError,
    AttributeError,
    OverflowError,
    NotImplementedError,
    RecursionError,
    struct.error,
    zlib.error,
)

_DUMMY_TEXT: Final = "ANONYMIZED"
_DUMMY_BY_VR: Final[dict[str, object]] = {
    "AE": _DUMMY_TEXT,
    "AS": "000Y",
    "CS": _DUMMY_TEXT,
    "DA": "19000101",
    "DS": "0",
    "DT": "19000101000000",
    "IS": "0",
    "LO": _DUMMY_TEXT,
    "LT": _DUMMY_TEXT,
    "PN": _DUMMY_TEXT,
    "SH": _DUMMY_TEXT,
    "ST": _DUMMY_TEXT,
    "TM": "000000.00",
    "UC": _DUMMY_TEXT,
    "UR": _DUMMY_TEXT,
    "UT": _DUMMY_TEXT,
}
# Eight zero bytes are even in length and a whole number of values for OB, OW, OL, OF, OV and OD.
_DUMMY_BYTES: Final = b"\x00" * 8
_BINARY_VRS: Final = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW"})
_NUMERIC_VRS: Final = frozenset(
    {"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "AT", "US or SS", "US or OW"}
)
_CODE_VALUE_TAGS: Final = (0x00080100, 0x00080119, 0x00080120)
_PIXEL_TAGS: Final = (0x7FE00010, 0x7FE00008, 0x7FE00009)

# Modalities whose images usually carry text in the pixels (patient name, dates, measurements),
# whatever BurnedInAnnotation says: the attribute is often missing or wrong on these devices.
_BURNED_IN_MODALITIES: Final = frozenset({"US", "ES", "XC", "OT", "SC", "GM", "SM", "DOC"})
# Projection and photographic modalities whose images often carry burned-in markers or labels;
# flagged when BurnedInAnnotation does not say NO.
_UNLESS_DECLARED_CLEAN_MODALITIES: Final = frozenset(
    {"CR", "DX", "MG", "XA", "RF", "PX", "IO", "RG", "OP", "OPT", "BDUS", "IVUS"}
)
# SOP classes whose pixels are screen captures, photographs or video: secondary capture,
# ultrasound (current and retired), visible light endoscopy, microscopy and photography.
_BURNED_IN_SOP_CLASSES: Final = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.7.1",
        "1.2.840.10008.5.1.4.1.1.7.2",
        "1.2.840.10008.5.1.4.1.1.7.3",
        "1.2.840.10008.5.1.4.1.1.7.4",
        "1.2.840.10008.5.1.4.1.1.6",
        "1.2.840.10008.5.1.4.1.1.6.1",
        "1.2.840.10008.5.1.4.1.1.3",
        "1.2.840.10008.5.1.4.1.1.3.1",
        "1.2.840.10008.5.1.4.1.1.77.1.1",
        "1.2.840.10008.5.1.4.1.1.77.1.1.1",
        "1.2.840.10008.5.1.4.1.1.77.1.2",
        "1.2.840.10008.5.1.4.1.1.77.1.2.1",
        "1.2.840.10008.5.1.4.1.1.77.1.3",
        "1.2.840.10008.5.1.4.1.1.77.1.4",
        "1.2.840.10008.5.1.4.1.1.77.1.4.1",
        "1.2.840.10008.5.1.4.1.1.77.1.5.1",
        "1.2.840.10008.5.1.4.1.1.77.1.5.2",
        "1.2.840.10008.5.1.4.1.1.77.1.6",
        "1.2.840.10008.5.1.4.1.1.77.1.7",
    }
)


class InvalidDicom(InvalidInput):
    """The upload is not a DICOM Part 10 file, or one too damaged to read."""

    code = "invalid_dicom"


def sniff_dicom(data: bytes) -> bool:
    """Whether ``data`` starts like a DICOM Part 10 file: a 128-byte preamble, then ``DICM``."""
    return data[_PREAMBLE_END : _PREAMBLE_END + len(_MAGIC)] == _MAGIC


def parse_dicom(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> FileDataset:
    """Parse an uploaded DICOM Part 10 file, or raise :class:`InvalidDicom`.

    Every element is decoded here, so a file that would fail half-way through de-identification
    fails at the door instead. Messages never quote a value from the file.

    Raises:
        PayloadTooLarge: ``data`` is longer than ``max_bytes``, or is deflated and inflates past it.
        InvalidDicom: it is not a DICOM file, is damaged, lacks its transfer syntax or its SOP
            class and instance UIDs, or is a DICOMDIR (a media index, not an instance).
    """
    if len(data) > max_bytes:
        raise PayloadTooLarge(
            f"the DICOM file is {len(data)} bytes; the limit is {max_bytes}",
            hint="split multi-frame uploads or ask an administrator to raise the limit",
        )
    if not sniff_dicom(data):
        raise InvalidDicom(
            "not a DICOM file: the 'DICM' marker after the 128-byte preamble is missing",
            hint="upload a DICOM Part 10 file as written by a modality or PACS export",
        )
    try:
        _refuse_deflate_bomb(data, max_bytes)
        dataset = dcmread(io.BytesIO(data), force=False)
        _decode_all(dataset)
    except _PARSE_ERRORS as exc:
        # The parser's message can quote element values, so only its type is passed on.
        raise InvalidDicom(
            "not a valid DICOM file: its content could not be parsed",
            hint=f"the DICOM parser stopped with {type(exc).__name__}; the file may be truncated",
        ) from None
    meta = dataset.file_meta
    if not meta.get("TransferSyntaxUID"):
        raise InvalidDicom(
            "not a valid DICOM file: the file meta information has no transfer syntax"
        )
    sop_class = dataset.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")
    if not sop_class or not (
        dataset.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID")
    ):
        raise InvalidDicom("not a valid DICOM file: it names no SOP class or no SOP instance")
    if sop_class == _MEDIA_STORAGE_DIRECTORY:
        raise InvalidDicom(
            "a DICOMDIR is an index of a DICOM medium, not an image",
            hint="upload the image files the DICOMDIR lists",
        )
    return dataset


def _refuse_deflate_bomb(data: bytes, max_bytes: int) -> None:
    """Refuse a deflated data set that would inflate past ``max_bytes``.

    pydicom inflates a Deflated Explicit VR Little Endian data set in one piece, and deflate
    compresses up to about 1000:1, so a small upload could exhaust memory. The file meta
    information (always explicit VR little endian, PS3.10 7.1) is walked here to find the
    transfer syntax and where the data set starts, and the inflation is bounded.
    """
    position = _PREAMBLE_END + len(_MAGIC)
    transfer_syntax = b""
    while position + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, position)
        if group != 0x0002:
            break
        vr = data[position + 4 : position + 6]
        if vr in _LONG_LENGTH_VRS:
            (length,) = struct.unpack_from("<L", data, position + 8)
            header = 12
        else:
            (length,) = struct.unpack_from("<H", data, position + 6)
            header = 8
        value = data[position + header : position + header + length]
        if element == 0x0010:
            transfer_syntax = value.rstrip(b" \x00")
        position += header + length
    if transfer_syntax != _DEFLATED:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = inflater.decompress(data[position:], max_bytes + 1)
    if len(inflated) > max_bytes:
        raise PayloadTooLarge(
            f"the deflated DICOM data set inflates to more than {max_bytes} bytes",
            hint="send the file with an uncompressed or image-compressed transfer syntax",
        )


def _decode_all(dataset: Dataset) -> None:
    # Iterating a dataset converts each raw element to its value; sequences parse their items.
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value:
                _decode_all(item)


class ImagingMetadata(TypedDict):
    """What an ImagingStudy (and its series and instance) needs from one DICOM instance."""

    study_instance_uid: str | None
    series_instance_uid: str | None
    sop_instance_uid: str | None
    sop_class_uid: str | None
    modality: str | None
    body_site: str | None
    laterality: str | None
    number_of_frames: int
    series_number: int | None
    instance_number: int | None
    study_description: str | None
    series_description: str | None
    study_date: str | None
    transfer_syntax_uid: str | None


def extract_metadata(dataset: Dataset) -> ImagingMetadata:
    """The ImagingStudy-relevant fields of ``dataset``; absent or malformed values become None.

    ``number_of_frames`` is NumberOfFrames when valid, else 1 for an image and 0 without pixels.
    ``study_date`` is an ISO ``YYYY-MM-DD`` date when StudyDate is a valid date.
    """
    meta = getattr(dataset, "file_meta", None)
    has_pixels = any(tag in dataset for tag in _PIXEL_TAGS)
    frames = _int_or_none(dataset, 0x00280008)
    return {
        "study_instance_uid": _text_or_none(dataset, 0x0020000D),
        "series_instance_uid": _text_or_none(dataset, 0x0020000E),
        "sop_instance_uid": _text_or_none(dataset, 0x00080018),
        "sop_class_uid": _text_or_none(dataset, 0x00080016),
        "modality": _text_or_none(dataset, 0x00080060),
        "body_site": _text_or_none(dataset, 0x00180015),
        "laterality": _text_or_none(dataset, 0x00200060) or _text_or_none(dataset, 0x00200062),
        "number_of_frames": frames if frames is not None and frames > 0 else int(has_pixels),
        "series_number": _int_or_none(dataset, 0x00200011),
        "instance_number": _int_or_none(dataset, 0x00200013),
        "study_description": _text_or_none(dataset, 0x00081030),
        "series_description": _text_or_none(dataset, 0x0008103E),
        "study_date": _iso_date_or_none(_text_or_none(dataset, 0x00080020)),
        "transfer_syntax_uid": _text_or_none(meta, 0x00020010) if meta is not None else None,
    }


def _first(dataset: Dataset, tag: int) -> object:
    element = dataset.get(tag)
    if element is None or element.VR == "SQ" or element.value is None:
        return None
    value = element.value
    if isinstance(value, MultiValue | list):
        return value[0] if value else None
    return value


def _text_or_none(dataset: Dataset, tag: int) -> str | None:
    value = _first(dataset, tag)
    if value is None or isinstance(value, bytes):
        return None
    text = str(value).strip(" \x00")
    return text or None


def _int_or_none(dataset: Dataset, tag: int) -> int | None:
    text = _text_or_none(dataset, tag)
    if text is None:
        return None
    try:
        return int(float(text))
    except (ValueError, OverflowError):
        return None


def _iso_date_or_none(text: str | None) -> str | None:
    parsed = _parse_da(text) if text else None
    return parsed.isoformat() if parsed else None


def _parse_da(text: str) -> date | None:
    digits = text.strip()
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None


@dataclass(frozen=True)
class BurnedInAssessment:
    """Whether pixel data may show identifying text or features, and why."""

    risk: bool
    reasons: tuple[str, ...]


def assess_burned_in(dataset: Dataset) -> BurnedInAssessment:
    """Flag images whose pixels may carry identifying text or a recognisable face.

    Header de-identification cannot clean pixels; this only says which images need a human look
    (or the Clean Pixel Data option, which we do not implement) before release.
    """
    reasons: list[str] = []
    burned_in = (_text_or_none(dataset, 0x00280301) or "").upper()
    if burned_in == "YES":
        reasons.append("BurnedInAnnotation is YES: the pixels contain burned-in text")
    if (_text_or_none(dataset, 0x00280302) or "").upper() == "YES":
        reasons.append(
            "RecognizableVisualFeatures is YES: the image may show a face or other features"
        )
    if any(tag in dataset for tag in _PIXEL_TAGS):
        modality = (_text_or_none(dataset, 0x00080060) or "").upper()
        sop_class = _text_or_none(dataset, 0x00080016) or ""
        declared = burned_in or "absent"
        if modality in _BURNED_IN_MODALITIES:
            reasons.append(
                f"modality {modality} commonly has burned-in text (BurnedInAnnotation {declared})"
            )
        elif modality in _UNLESS_DECLARED_CLEAN_MODALITIES and burned_in != "NO":
            reasons.append(
                f"modality {modality} often has burned-in labels and BurnedInAnnotation is "
                f"{declared}, not NO"
            )
        if sop_class in _BURNED_IN_SOP_CLASSES:
            reasons.append(
                f"SOP class {sop_class} holds captured, photographic or ultrasound pixels "
                f"that commonly show text (BurnedInAnnotation {declared})"
            )
    return BurnedInAssessment(risk=bool(reasons), reasons=tuple(reasons))


@dataclass(frozen=True)
class DeidResult:
    """A de-identified DICOM Part 10 file and what the caller must still decide about it."""

    data: bytes = field(repr=False)
    #: True when the pixels may show identifying text or features: release needs a human check.
    burned_in_risk: bool
    reasons: tuple[str, ...]
    #: Metadata of the de-identified copy (new UIDs, shifted or removed dates).
    metadata: ImagingMetadata


class UidRemapper:
    """Maps original UIDs to new ones, stable for one key and unlinkable without it.

    ``new = root + decimal(HMAC-SHA256(key, context || uid))``. Under the default ``2.25.`` root
    the first 128 bits of the MAC are shaped into a version-8 (custom) UUID as ISO/IEC 9834-8
    expects for that arc, so a UID is at most 44 characters. Under another root the decimal is cut
    to the digits the 64-character limit leaves, which must be at least 20 (66 bits).
    """

    def __init__(self, key: bytes, *, root: str = DEFAULT_UID_ROOT) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the UID key must be at least {MIN_KEY_BYTES} bytes")
        if not _ROOT_PATTERN.fullmatch(root) or 64 - len(root) < 20:
            raise ValueError(
                "the UID root must be a dotted numeric prefix ending in '.' of at most 44 characters"
            )
        self._key = key
        self._root = root

    def remap(self, uid: str) -> str:
        """The new UID for ``uid``; padding is ignored, so ``'1.2\\x00'`` maps like ``'1.2'``."""
        original = uid.strip(" \x00")
        digest = hmac.new(self._key, _UID_CONTEXT + original.encode("utf-8"), hashlib.sha256)
        if self._root == DEFAULT_UID_ROOT:
            number = _uuid8(digest.digest()[:16]).int
        else:
            number = int.from_bytes(digest.digest(), "big") % 10 ** (64 - len(self._root))
        return f"{self._root}{number}"


def _uuid8(raw: bytes) -> uuid.UUID:
    # RFC 9562 version 8: set the version nibble to 8 and the variant bits to 10.
    value = int.from_bytes(raw, "big")
    value &= ~(0xF000 << 64) & ~(0xC000 << 48)
    value |= (0x8 << 76) | (0x8000 << 48)
    return uuid.UUID(int=value)


def is_valid_uid(uid: str) -> bool:
    """DICOM UID syntax (PS3.5 9.1): digits and dots, no leading zeros, at most 64 characters."""
    return len(uid) <= 64 and _UID_PATTERN.fullmatch(uid) is not None


def derive_date_shift(key: bytes, patient_reference: str, *, max_days: int = 3650) -> int:
    """A per-patient shift in ``[-max_days, -1]`` days, stable for one key without storing it.

    Shifting into the past keeps dates plausible; never zero, because a zero shift would release
    the real dates.
    """
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the date-shift key must be at least {MIN_KEY_BYTES} bytes")
    if max_days < 1:
        raise ValueError("max_days must be at least 1")
    message = _DATE_SHIFT_CONTEXT + patient_reference.encode("utf-8")
    number = int.from_bytes(hmac.new(key, message, hashlib.sha256).digest(), "big")
    return -(1 + number % max_days)


class DicomDeidentifier:
    """Applies the Basic Application Level Confidentiality Profile with a recipient's key.

    One instance per study and recipient (or per recipient, to link a patient's studies): the
    ``key`` fixes the UID mapping, ``date_shift_days`` (from :func:`derive_date_shift` or the
    caller's store) selects the Retain Longitudinal Temporal Information with Modified Dates
    option; ``None`` removes dates as the basic profile says.
    """

    def __init__(
        self,
        *,
        key: bytes,
        date_shift_days: int | None = None,
        uid_root: str = DEFAULT_UID_ROOT,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if date_shift_days == 0:
            raise ValueError("a zero date shift keeps the real dates; pass None to remove dates")
        if date_shift_days is not None and abs(date_shift_days) > 36_500:
            raise ValueError("a date shift of more than a hundred years is not plausible")
        self._uids = UidRemapper(key, root=uid_root)
        self._shift = None if date_shift_days is None else timedelta(days=date_shift_days)
        self._max_bytes = max_bytes

    def remap_uid(self, uid: str) -> str:
        """The UID this de-identifier gives ``uid``, e.g. to rewrite a reference stored elsewhere."""
        return self._uids.remap(uid)

    def deidentify(self, data: bytes) -> DeidResult:
        """De-identify one DICOM Part 10 file.

        Raises:
            InvalidDicom: ``data`` is not a usable DICOM file (see :func:`parse_dicom`).
            PayloadTooLarge: ``data`` is over the size limit.
        """
        dataset = parse_dicom(data, max_bytes=self._max_bytes)
        assessment = assess_burned_in(dataset)
        original_meta = dataset.file_meta
        self._clean(dataset)
        self._mark(dataset)
        dataset.file_meta = self._file_meta(dataset, original_meta)
        # The preamble is free for application data (TIFF headers of dual-format files), so it
        # may carry anything; a de-identified file gets the all-zero preamble.
        dataset.preamble = b"\x00" * _PREAMBLE_END
        buffer = io.BytesIO()
        dcmwrite(buffer, dataset, enforce_file_format=True)
        return DeidResult(
            data=buffer.getvalue(),
            burned_in_risk=assessment.risk,
            reasons=assessment.reasons,
            metadata=extract_metadata(dataset),
        )

    def _clean(self, dataset: Dataset) -> None:
        for tag in [int(element.tag) for element in dataset]:
            element = dataset[tag]
            if (
                is_private(tag)
                or (tag & 0xFFFF) == 0
                or (tag >> 16) == 0x0002
                or repeating_group_action(tag)
            ):
                # Private attributes, curves and overlays are removed; so are retired group
                # lengths, which would be wrong once elements are gone, and file meta elements
                # misplaced in the data set, since the file meta information is rebuilt.
                del dataset[tag]
                continue
            row = BASIC_PROFILE.get(tag)
            code = row.basic if row is not None else STRICTER_THAN_PROFILE.get(tag)
            if code is None:
                if element.VR == "SQ":
                    self._clean_items(element)
                continue
            if (
                self._shift is not None
                and row is not None
                and row.modified_dates
                and _shift_dates(element, self._shift)
            ):
                continue
            self._apply(dataset, element, resolve_action(code, is_sequence=element.VR == "SQ"))

    def _clean_items(self, element: DataElement) -> None:
        for item in element.value:
            self._clean(item)

    def _apply(self, dataset: Dataset, element: DataElement, action: Action) -> None:
        if action is Action.REMOVE:
            del dataset[element.tag]
        elif action is Action.ZERO:
            element.value = [] if element.VR == "SQ" else element.empty_value
        elif action is Action.UID:
            element.value = self._remapped(element.value)
        elif action is Action.RECURSE:
            self._clean_items(element)
        elif action is Action.DUMMY:
            self._dummy(element)
        else:  # pragma: no cover - the basic profile uses only D, Z, X, U and U*.
            raise ValueError(f"the basic profile has no action {action}")

    def _dummy(self, element: DataElement) -> None:
        if element.VR == "SQ":
            items = list(element.value)
            if any(tag in item for item in items for tag in _CODE_VALUE_TAGS):
                # In a code sequence the code is the identifier (a staff number, say), and the
                # table lists nothing inside it to clean, so the items give way to a dummy code.
                element.value = [_dummy_code()]
            else:
                self._clean_items(element)
        elif element.VR == "UI":
            element.value = self._remapped(element.value) or self._uids.remap(
                f"dummy:{int(element.tag):08x}"
            )
        elif element.VR in _BINARY_VRS:
            element.value = _DUMMY_BYTES
        elif element.VR in _NUMERIC_VRS:
            element.value = 0
        else:
            element.value = _DUMMY_BY_VR.get(element.VR, _DUMMY_TEXT)

    def _remapped(self, value: object) -> object:
        if isinstance(value, bytes):
            value = value.decode("ascii", errors="replace")
        if isinstance(value, MultiValue | list):
            return [self._uids.remap(str(v)) for v in value if str(v).strip(" \x00")]
        if value is None or not str(value).strip(" \x00"):
            return value
        return self._uids.remap(str(value))

    def _mark(self, dataset: Dataset) -> None:
        options = [PROFILE_EDITION.replace(", Table E.1-1", "") + " Basic Profile"]
        codes = [_code("113100", "Basic Application Confidentiality Profile")]
        if self._shift is not None:
            options.append("Retain Longitudinal Temporal Information Modified Dates Option")
            codes.append(
                _code("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
            )
        options.append("medcollab: private tags, overlays, SR and graphic text removed")
        dataset.PatientIdentityRemoved = "YES"
        dataset.DeidentificationMethod = options
        dataset.DeidentificationMethodCodeSequence = codes
        dataset.LongitudinalTemporalInformationModified = (
            "MODIFIED" if self._shift is not None else "REMOVED"
        )

    def _file_meta(self, dataset: Dataset, original: FileMetaDataset) -> FileMetaDataset:
        # Rebuilt rather than edited: the original may name the sending AE titles and the
        # vendor's implementation, and must not keep the old SOP Instance UID.
        meta = FileMetaDataset()
        sop_class = dataset.get("SOPClassUID") or original.get("MediaStorageSOPClassUID")
        if sop_class:
            meta.MediaStorageSOPClassUID = sop_class
        sop_instance = dataset.get("SOPInstanceUID")
        if sop_instance:
            meta.MediaStorageSOPInstanceUID = sop_instance
        elif original.get("MediaStorageSOPInstanceUID"):
            meta.MediaStorageSOPInstanceUID = UID(
                self._uids.remap(original.MediaStorageSOPInstanceUID)
            )
        meta.TransferSyntaxUID = original.TransferSyntaxUID
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        return meta


def _shift_dates(element: DataElement, shift: timedelta) -> bool:
    """Apply the Modified Dates option; False when the element is not a date it can shift."""
    if element.VR == "TM":
        # A shift by whole days leaves the time of day as it was.
        return True
    if element.VR not in ("DA", "DT") or element.value in (None, ""):
        return element.VR in ("DA", "DT")
    values = element.value if isinstance(element.value, MultiValue | list) else [element.value]
    shifted = [_shift_one(element.VR, str(v), shift) for v in values]
    if any(s is None for s in shifted):
        return False
    element.value = shifted if len(shifted) > 1 else shifted[0]
    return True


def _shift_one(vr: str, text: str, shift: timedelta) -> str | None:
    text = text.strip(" \x00")
    if vr == "DA":
        day = _parse_da(text)
        rest = ""
    else:
        match = _DT_PATTERN.fullmatch(text)
        if match is None:
            return None
        day = _parse_da(match.group(1))
        # The UTC offset is dropped: Timezone Offset From UTC is removed too, and a zone narrows
        # down where the patient was.
        rest = match.group(2) or ""
    if day is None:
        return None
    try:
        return (day + shift).strftime("%Y%m%d") + rest
    except OverflowError:
        return None


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


def _dummy_code() -> Dataset:
    item = Dataset()
    item.CodeValue = _DUMMY_TEXT
    # Coding scheme designators beginning with 99 are reserved for local use.
    item.CodingSchemeDesignator = "99MEDCOLLAB"
    item.CodeMeaning = "Anonymized"
    return item


def deidentify(
    data: bytes,
    *,
    key: bytes,
    date_shift_days: int | None = None,
    uid_root: str = DEFAULT_UID_ROOT,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> DeidResult:
    """De-identify one DICOM file; see :class:`DicomDeidentifier` for the parameters."""
    deidentifier = DicomDeidentifier(
        key=key, date_shift_days=date_shift_days, uid_root=uid_root, max_bytes=max_bytes
    )
    return deidentifier.deidentify(data)


__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_UID_ROOT",
    "BurnedInAssessment",
    "DeidResult",
    "DicomDeidentifier",
    "ImagingMetadata",
    "InvalidDicom",
    "UidRemapper",
    "assess_burned_in",
    "deidentify",
    "derive_date_shift",
    "extract_metadata",
    "is_valid_uid",
    "parse_dicom",
    "sniff_dicom",
]
