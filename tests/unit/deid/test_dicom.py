"""DICOM header de-identification over pydicom's bundled files and synthesised edge cases.

Only files already on disk are used: pydicom's ``get_testdata_files`` would try to download the
larger ones, and tests never need the network.
"""

from __future__ import annotations

import io
import random
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import pytest
from pydicom.data.data_manager import DATA_ROOT
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import dcmread
from pydicom.filewriter import dcmwrite
from pydicom.multival import MultiValue
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from medcollab.deid.dicom import (
    DicomDeidentifier,
    InvalidDicom,
    UidRemapper,
    assess_burned_in,
    deidentify,
    derive_date_shift,
    extract_metadata,
    is_valid_uid,
    parse_dicom,
    sniff_dicom,
)
from medcollab.deid.dicom_profile import (
    BASIC_PROFILE,
    CURVE_GROUPS,
    OVERLAY_GROUPS,
    PROFILE_EDITION,
    STRICTER_THAN_PROFILE,
    Action,
    resolve_action,
)
from medcollab.errors import InvalidInput, PayloadTooLarge

KEY = b"recipient-key-for-study-0001-abc"
OTHER_KEY = b"recipient-key-for-study-0002-xyz"
ROOT = Path(DATA_ROOT)
BUNDLED = sorted(
    p
    for folder in ("test_files", "charset_files", "palettes")
    for p in (ROOT / folder).rglob("*")
    if p.is_file() and "__pycache__" not in p.parts
)

# Bundled files with the DICM marker that parse_dicom still refuses, and the words of the reason.
# Everything else with the marker must de-identify.
REFUSED_DICOM = {
    "DICOMDIR": "DICOMDIR",
    "DICOMDIR-bigEnd": "DICOMDIR",
    "DICOMDIR-empty.dcm": "DICOMDIR",
    "DICOMDIR-implicit": "DICOMDIR",
    "DICOMDIR-nooffset": "DICOMDIR",
    "DICOMDIR-nopatient": "DICOMDIR",
    "DICOMDIR-reordered": "DICOMDIR",
    "empty_charset_LEI.dcm": "no SOP class or no SOP instance",
    "nested_priv_SQ.dcm": "no SOP class or no SOP instance",
    "meta_missing_tsyntax.dcm": "no transfer syntax",
}
# SC_rgb_jpeg.dcm declares explicit VR in its file meta but is encoded implicitly; pydicom says so
# with a UserWarning and reads it correctly. The file is valid enough to de-identify.
EXPLICIT_VR_WARNING = "ignore:Expected explicit VR, but found implicit VR:UserWarning"
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _accepted(path: Path) -> bool:
    return sniff_dicom(path.read_bytes()) and path.name not in REFUSED_DICOM


ACCEPTED = [p for p in BUNDLED if _accepted(p)]
REFUSED = [p for p in BUNDLED if not _accepted(p)]


def _walk(dataset: Dataset) -> Iterator[DataElement]:
    for element in dataset:
        yield element
        if element.VR == "SQ":
            for item in element.value:
                yield from _walk(item)


def _values(element: DataElement) -> list[str]:
    value = element.value
    items = list(value) if isinstance(value, MultiValue | list) else [value]
    return [str(v).strip(" \x00") for v in items if v is not None and str(v).strip(" \x00")]


def _original_values(dataset: Dataset) -> dict[int, set[str]]:
    values: dict[int, set[str]] = defaultdict(set)
    for element in _walk(dataset):
        if element.VR not in ("SQ", "OB", "OW", "UN"):
            values[int(element.tag)].update(_values(element))
    return values


def test_bundled_corpus_is_present() -> None:
    # A pydicom upgrade that moves its test files must not silently turn this suite into a no-op.
    assert len(ACCEPTED) >= 170
    assert {p.name for p in ACCEPTED} >= {
        "CT_small.dcm",
        "MR_small.dcm",
        "test-SR.dcm",
        "rtplan.dcm",
    }


@pytest.mark.filterwarnings(EXPLICIT_VR_WARNING)
@pytest.mark.parametrize("path", ACCEPTED, ids=_rel)
def test_bundled_file_keeps_no_basic_profile_identifier(path: Path) -> None:
    data = path.read_bytes()
    original = parse_dicom(data)
    result = deidentify(data, key=KEY)
    out = parse_dicom(result.data)
    before = _original_values(original)
    original_uids = {
        v for element in _walk(original) if element.VR == "UI" for v in _values(element)
    }

    for element in _walk(out):
        tag = int(element.tag)
        assert not element.tag.is_private, f"private {element.tag} remains"
        assert (tag >> 16) not in CURVE_GROUPS | OVERLAY_GROUPS, f"{element.tag} remains"
        row = BASIC_PROFILE.get(tag)
        if row is None:
            continue
        action = resolve_action(row.basic, is_sequence=element.VR == "SQ")
        assert action is not Action.REMOVE, f"{row.name} should have been removed"
        if action is Action.ZERO:
            assert element.is_empty, f"{row.name} should be empty"
        elif action is Action.DUMMY and element.VR != "SQ":
            assert not element.is_empty, f"{row.name} needs a non-empty dummy"
            assert not set(_values(element)) & before[tag], f"{row.name} kept its value"
        elif action is Action.UID:
            for uid in _values(element):
                assert is_valid_uid(uid), f"{row.name} has an invalid UID"
                assert uid not in original_uids, f"{row.name} kept an original UID"

    assert out.PatientIdentityRemoved == "YES"
    assert "PS3.15" in out.DeidentificationMethod[0]
    assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert out.LongitudinalTemporalInformationModified == "REMOVED"
    assert out.file_meta.MediaStorageSOPInstanceUID == out.get(
        "SOPInstanceUID", out.file_meta.MediaStorageSOPInstanceUID
    )
    assert out.file_meta.MediaStorageSOPInstanceUID != original.file_meta.get(
        "MediaStorageSOPInstanceUID"
    )
    assert out.preamble == b"\x00" * 128
    for tag in PIXEL_TAGS:
        if tag in original:
            assert out[tag].value == original[tag].value, "pixel data must be untouched"


@pytest.mark.filterwarnings(EXPLICIT_VR_WARNING)
@pytest.mark.parametrize("path", ACCEPTED, ids=_rel)
def test_bundled_file_output_bytes_do_not_contain_patient_name_or_id(path: Path) -> None:
    data = path.read_bytes()
    # Read without decoding, to search for the exact bytes the file stored.
    raw = dcmread(io.BytesIO(data))
    output = deidentify(data, key=KEY).data
    for tag in PIXEL_TAGS:
        if tag in raw:
            # Pixels are kept byte for byte and may contain any byte string by chance.
            output = output.replace(raw[tag].value, b"")
    for tag in (0x00100010, 0x00100020):
        if tag not in raw:
            continue
        stored = raw.get_item(tag).value or b""
        whole = stored.strip(b" \x00")
        parts = whole.replace(b"=", b"^").split(b"^")
        # Three-letter fragments ("Doe", "PLA") match unrelated bytes by chance; longer ones do not.
        for needle in {whole, *parts}:
            if len(needle) >= 4:
                assert needle not in output, f"{needle!r} survives in the output"


@pytest.mark.parametrize("path", REFUSED, ids=_rel)
def test_bundled_non_dicom_and_unusable_files_are_refused(path: Path) -> None:
    expected = REFUSED_DICOM.get(path.name, "not a DICOM file")
    with pytest.raises(InvalidDicom, match=expected):
        parse_dicom(path.read_bytes())


def test_same_key_gives_the_same_output_and_another_key_other_uids() -> None:
    data = (ROOT / "test_files" / "CT_small.dcm").read_bytes()
    first = deidentify(data, key=KEY)
    assert deidentify(data, key=KEY).data == first.data
    other = deidentify(data, key=OTHER_KEY)
    for field in ("study_instance_uid", "series_instance_uid", "sop_instance_uid"):
        assert first.metadata[field] != other.metadata[field]


def test_instances_of_one_study_keep_their_study_series_relations() -> None:
    folder = ROOT / "test_files" / "dicomdirtests" / "98892003"
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    originals = [parse_dicom(p.read_bytes()) for p in paths]
    outputs = [parse_dicom(deidentify(p.read_bytes(), key=KEY).data) for p in paths]
    assert len({o.SeriesInstanceUID for o in originals}) > 1, "need several series"

    study_map: dict[str, str] = {}
    series_map: dict[str, str] = {}
    for before, after in zip(originals, outputs, strict=True):
        assert study_map.setdefault(before.StudyInstanceUID, after.StudyInstanceUID) == (
            after.StudyInstanceUID
        )
        assert series_map.setdefault(before.SeriesInstanceUID, after.SeriesInstanceUID) == (
            after.SeriesInstanceUID
        )
    # The mapping is one-to-one: distinct originals stay distinct.
    assert len(set(study_map.values())) == len(study_map)
    assert len(set(series_map.values())) == len(series_map)
    assert len({o.SOPInstanceUID for o in outputs}) == len(outputs)


def test_remap_uid_matches_what_deidentify_writes() -> None:
    data = (ROOT / "test_files" / "MR_small.dcm").read_bytes()
    original = parse_dicom(data)
    deidentifier = DicomDeidentifier(key=KEY)
    out = parse_dicom(deidentifier.deidentify(data).data)
    assert out.StudyInstanceUID == deidentifier.remap_uid(original.StudyInstanceUID)
    assert out.FrameOfReferenceUID == deidentifier.remap_uid(original.FrameOfReferenceUID)


def _synthetic(**attributes: object) -> Dataset:
    dataset = Dataset()
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    dataset.SOPInstanceUID = generate_uid()
    dataset.StudyInstanceUID = "1.2.3.4.5.6.7"
    dataset.SeriesInstanceUID = "1.2.3.4.5.6.7.1"
    dataset.Modality = "CT"
    dataset.PatientName = "Zhang^Wei"
    dataset.PatientID = "MRN-0042-7731"
    dataset.PatientBirthDate = "19610203"
    for keyword, value in attributes.items():
        setattr(dataset, keyword, value)
    return dataset


def _to_bytes(dataset: Dataset, *, pixels: bool = True) -> bytes:
    if pixels and "PixelData" not in dataset:
        dataset.Rows = 2
        dataset.Columns = 2
        dataset.BitsAllocated = 8
        dataset.BitsStored = 8
        dataset.HighBit = 7
        dataset.SamplesPerPixel = 1
        dataset.PixelRepresentation = 0
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.PixelData = b"\x01\x02\x03\x04"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.SourceApplicationEntityTitle = "HOSPITAL_PACS"
    dataset.file_meta = meta
    buffer = io.BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def test_two_synthetic_instances_sharing_a_study_keep_it_and_their_references() -> None:
    first = _synthetic()
    second = _synthetic()
    reference = Dataset()
    reference.ReferencedSOPClassUID = first.SOPClassUID
    reference.ReferencedSOPInstanceUID = first.SOPInstanceUID
    second.ReferencedImageSequence = [reference]

    out_first = parse_dicom(deidentify(_to_bytes(first), key=KEY).data)
    out_second = parse_dicom(deidentify(_to_bytes(second), key=KEY).data)
    assert out_first.StudyInstanceUID == out_second.StudyInstanceUID != first.StudyInstanceUID
    assert out_first.SeriesInstanceUID == out_second.SeriesInstanceUID
    assert out_first.SOPInstanceUID != out_second.SOPInstanceUID
    # The reference (X/Z/U* in Table E.1-1) now points at the de-identified first instance.
    pointer = out_second.ReferencedImageSequence[0]
    assert pointer.ReferencedSOPInstanceUID == out_first.SOPInstanceUID
    assert pointer.ReferencedSOPClassUID == first.SOPClassUID


def test_nested_identifiers_private_tags_overlays_and_padding_are_cleaned() -> None:
    dataset = _synthetic()
    dataset.add_new(0x00090010, "LO", "ACME private creator")
    dataset.add_new(0x00091001, "LO", "Zhang Wei, bed 12")
    dataset.add_new(0x00080000, "UL", 1234)
    dataset.add_new(0x60000010, "US", 2)
    dataset.add_new(0x60003000, "OW", b"\x00\x01")
    dataset.add_new(0x60000022, "LO", "Zhang Wei overlay")
    dataset.add_new(0x50000005, "US", 1)
    dataset.add_new(0xFFFCFFFC, "OB", b"leftover Zhang^Wei")
    observer = Dataset()
    observer.VerifyingObserverName = "Li^Na"
    observer.VerifyingOrganization = "Example Hospital"
    observer.add_new(0x00290010, "LO", "Vendor")
    observer.add_new(0x00291010, "LO", "Li Na's staff number")
    person = Dataset()
    person.CodeValue = "STAFF-7788"
    person.CodingSchemeDesignator = "99HOSP"
    person.CodeMeaning = "Li Na"
    observer.VerifyingObserverIdentificationCodeSequence = []
    dataset.VerifyingObserverSequence = [observer]
    operator = Dataset()
    operator.PersonIdentificationCodeSequence = [person]
    dataset.OperatorIdentificationSequence = [operator]
    physician = Dataset()
    physician.PersonIdentificationCodeSequence = [person]
    dataset.PhysiciansOfRecordIdentificationSequence = [physician]
    content = Dataset()
    content.ValueType = "TEXT"
    content.TextValue = "Patient Zhang Wei reports pain since the fall at home."
    content.PersonName = "Zhang^Wei"
    dataset.ContentSequence = [content]
    dataset.ReferencedPatientPhotoSequence = [Dataset()]

    out = parse_dicom(deidentify(_to_bytes(dataset), key=KEY).data)
    tags = {int(e.tag) for e in _walk(out)}
    assert not any((t >> 16) & 1 for t in tags), "private tags remain"
    assert not any((t >> 16) in (0x5000, 0x6000) for t in tags), "curve or overlay remains"
    assert 0xFFFCFFFC not in tags
    assert 0x00080000 not in tags
    verified = out.VerifyingObserverSequence[0]
    assert verified.VerifyingObserverName == "ANONYMIZED"
    assert verified.VerifyingOrganization == "ANONYMIZED"
    assert "OperatorIdentificationSequence" not in out
    assert "PhysiciansOfRecordIdentificationSequence" not in out
    assert "ReferencedPatientPhotoSequence" not in out
    assert out.ContentSequence[0].TextValue == "ANONYMIZED"
    assert out.ContentSequence[0].PersonName == "ANONYMIZED"
    assert out.PatientName == ""
    assert out.PatientID == "ANONYMIZED"
    assert out.PatientBirthDate == ""
    output = deidentify(_to_bytes(dataset), key=KEY).data
    for needle in (b"Zhang", b"Wei", b"Li^Na", b"STAFF-7788", b"MRN-0042", b"HOSPITAL_PACS"):
        assert needle not in output


def test_dummies_follow_the_vr_the_file_gives() -> None:
    dataset = _synthetic()
    dataset.EncapsulatedDocument = b"%PDF-1.4 report for Zhang Wei"
    dataset.AnnotationGroupUID = ""
    # Container Identifier is LO in the dictionary; a file may still encode it with another VR.
    dataset.add_new(0x00400512, "US", 4242)
    out = parse_dicom(deidentify(_to_bytes(dataset), key=KEY).data)
    assert out.EncapsulatedDocument == b"\x00" * 8
    assert is_valid_uid(out.AnnotationGroupUID)
    assert out[0x00400512].value == 0


def test_a_person_identification_code_sequence_becomes_one_dummy_code() -> None:
    person = Dataset()
    person.CodeValue = "STAFF-7788"
    person.CodingSchemeDesignator = "99HOSP"
    person.CodeMeaning = "Li Na"
    dataset = _synthetic(PersonIdentificationCodeSequence=[person])

    out = parse_dicom(deidentify(_to_bytes(dataset), key=KEY).data)
    (code,) = out.PersonIdentificationCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("ANONYMIZED", "99MEDCOLLAB")


def test_dates_shift_by_exactly_the_given_days_and_times_stay() -> None:
    data = (ROOT / "test_files" / "CT_small.dcm").read_bytes()
    original = parse_dicom(data)
    result = deidentify(data, key=KEY, date_shift_days=-30)
    out = parse_dicom(result.data)
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        before = date.fromisoformat(_iso(getattr(original, keyword)))
        after = date.fromisoformat(_iso(getattr(out, keyword)))
        assert before - after == timedelta(days=30), keyword
    assert out.StudyTime == original.StudyTime
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    assert [c.CodeValue for c in out.DeidentificationMethodCodeSequence] == ["113100", "113107"]
    assert result.metadata["study_date"] == _iso(out.StudyDate)


def _iso(da: str) -> str:
    return f"{da[:4]}-{da[4:6]}-{da[6:8]}"


def test_datetimes_shift_their_date_and_drop_the_utc_offset() -> None:
    dataset = _synthetic(
        AcquisitionDateTime="20200301101010.123456+0800",
        StudyDate=["20200301", "20191231"],
        TimezoneOffsetFromUTC="+0800",
        PatientAge="058Y",
    )
    out = parse_dicom(deidentify(_to_bytes(dataset), key=KEY, date_shift_days=-1).data)
    assert out.AcquisitionDateTime == "20200229101010.123456"
    assert list(out.StudyDate) == ["20200229", "20191230"]
    assert "TimezoneOffsetFromUTC" not in out
    # Birth date and age are not longitudinal information; the option does not keep them.
    assert out.PatientBirthDate == ""
    assert "PatientAge" not in out


def test_unparseable_dates_fall_back_to_the_basic_profile() -> None:
    dataset = _synthetic(StudyDate="2020", AcquisitionDateTime="2020")
    out = parse_dicom(deidentify(_to_bytes(dataset), key=KEY, date_shift_days=-5).data)
    assert out.StudyDate == ""
    assert out.AcquisitionDateTime == "19000101000000"


def test_a_shift_past_the_calendar_falls_back_to_the_basic_profile() -> None:
    dataset = _synthetic(StudyDate="00010102", SeriesDate="20200101")
    out = parse_dicom(deidentify(_to_bytes(dataset), key=KEY, date_shift_days=-5).data)
    assert out.StudyDate == ""
    assert out.SeriesDate == "20191227"


def test_without_the_option_dates_are_removed_or_dummies() -> None:
    dataset = _synthetic(StudyDate="20200301", SeriesDate="20200301", AdmittingDate="20200228")
    out = parse_dicom(deidentify(_to_bytes(dataset), key=KEY).data)
    assert out.StudyDate == ""
    assert out.SeriesDate == "19000101"
    assert "AdmittingDate" not in out


def test_a_zero_date_shift_is_refused() -> None:
    with pytest.raises(ValueError, match="real dates"):
        DicomDeidentifier(key=KEY, date_shift_days=0)


@pytest.mark.parametrize(
    ("attributes", "risk"),
    [
        ({"BurnedInAnnotation": "YES"}, True),
        ({"Modality": "US", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.6.1"}, True),
        ({"Modality": "US", "BurnedInAnnotation": "NO"}, True),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7", "Modality": "OT"}, True),
        ({"Modality": "DX"}, True),
        ({"Modality": "DX", "BurnedInAnnotation": "NO"}, False),
        ({"RecognizableVisualFeatures": "YES"}, True),
        ({}, False),
    ],
)
def test_burned_in_annotation_risk_is_flagged(attributes: dict[str, str], risk: bool) -> None:
    result = deidentify(_to_bytes(_synthetic(**attributes)), key=KEY)
    assert result.burned_in_risk is risk
    assert bool(result.reasons) is risk


def test_burned_in_reason_names_the_cause() -> None:
    reasons = assess_burned_in(_synthetic(BurnedInAnnotation="YES", PixelData=b"\x00\x00")).reasons
    assert reasons == ("BurnedInAnnotation is YES: the pixels contain burned-in text",)


@pytest.mark.parametrize(
    "name", ["examples_palette.dcm", "examples_rgb_color.dcm", "ExplVR_BigEnd.dcm"]
)
def test_bundled_ultrasound_images_are_flagged(name: str) -> None:
    result = deidentify((ROOT / "test_files" / name).read_bytes(), key=KEY)
    assert result.burned_in_risk
    assert any("modality US" in reason for reason in result.reasons)


def test_images_without_pixels_carry_no_modality_based_flag() -> None:
    result = deidentify((ROOT / "test_files" / "test-SR.dcm").read_bytes(), key=KEY)
    assert not result.burned_in_risk
    assert result.metadata["number_of_frames"] == 0


_PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n" + b" " * 200
_ELF = b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 300
_EXE = b"MZ\x90\x00\x03\x00\x00\x00" + b"\x00" * 300


@pytest.mark.parametrize(
    "data",
    [_PDF, _ELF, _EXE, random.Random(1234).randbytes(4096), b"", b"DICM" + b"\x00" * 200],
    ids=["pdf", "elf", "exe", "random", "empty", "magic-at-start"],
)
def test_non_dicom_bytes_are_refused_with_a_clear_message(data: bytes) -> None:
    assert not sniff_dicom(data)
    with pytest.raises(InvalidDicom, match=r"^not a DICOM file") as caught:
        deidentify(data, key=KEY)
    assert isinstance(caught.value, InvalidInput)
    assert caught.value.code == "invalid_dicom"
    assert "Part 10" in caught.value.diagnostics()


def test_a_dicom_marker_followed_by_garbage_is_refused() -> None:
    data = b"\x00" * 128 + b"DICM" + random.Random(99).randbytes(2048)
    with pytest.raises(InvalidDicom, match=r"^not a valid DICOM file"):
        parse_dicom(data)


def test_a_truncated_header_is_refused() -> None:
    data = (ROOT / "test_files" / "CT_small.dcm").read_bytes()[:200]
    with pytest.raises(InvalidDicom, match=r"^not a valid DICOM file"):
        parse_dicom(data)


def test_oversized_uploads_are_refused_before_parsing() -> None:
    data = (ROOT / "test_files" / "CT_small.dcm").read_bytes()
    with pytest.raises(PayloadTooLarge):
        parse_dicom(data, max_bytes=len(data) - 1)
    with pytest.raises(PayloadTooLarge):
        DicomDeidentifier(key=KEY, max_bytes=1024).deidentify(data)


def test_a_deflate_bomb_is_refused_before_pydicom_inflates_it() -> None:
    dataset = _synthetic(PixelData=b"\x00" * (4 * 1024 * 1024), Rows=2048, Columns=2048)
    dataset.BitsAllocated = 8
    buffer = io.BytesIO()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    dataset.file_meta = meta
    dcmwrite(buffer, dataset, enforce_file_format=True)
    data = buffer.getvalue()
    assert len(data) < 64 * 1024
    with pytest.raises(PayloadTooLarge, match="inflates"):
        parse_dicom(data, max_bytes=1024 * 1024)
    assert parse_dicom(data, max_bytes=8 * 1024 * 1024).PixelData == dataset.PixelData


def test_extract_metadata_gives_the_imaging_study_fields() -> None:
    dataset = parse_dicom((ROOT / "test_files" / "CT_small.dcm").read_bytes())
    metadata = extract_metadata(dataset)
    assert metadata["study_instance_uid"] == dataset.StudyInstanceUID
    assert metadata["series_instance_uid"] == dataset.SeriesInstanceUID
    assert metadata["sop_instance_uid"] == dataset.SOPInstanceUID
    assert metadata["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.2"
    assert metadata["modality"] == "CT"
    assert metadata["number_of_frames"] == 1
    assert metadata["study_date"] == "2004-01-19"
    assert metadata["transfer_syntax_uid"] == "1.2.840.10008.1.2.1"
    multi = extract_metadata(
        parse_dicom((ROOT / "test_files" / "SC_rgb_rle_2frame.dcm").read_bytes())
    )
    assert multi["number_of_frames"] == 2


def test_extract_metadata_reads_body_site_and_leaves_absent_fields_none() -> None:
    dataset = _synthetic(BodyPartExamined="CHEST", Laterality="L", SeriesNumber="7")
    metadata = extract_metadata(parse_dicom(_to_bytes(dataset)))
    assert metadata["body_site"] == "CHEST"
    assert metadata["laterality"] == "L"
    assert metadata["series_number"] == 7
    assert metadata["instance_number"] is None


def test_uid_remapper_is_stable_valid_and_keyed() -> None:
    remapper = UidRemapper(KEY)
    new = remapper.remap("1.2.840.113619.2.1.1")
    assert new == remapper.remap("1.2.840.113619.2.1.1\x00")
    assert new != UidRemapper(OTHER_KEY).remap("1.2.840.113619.2.1.1")
    assert new.startswith("2.25.")
    assert is_valid_uid(new)
    assert len(new) <= 44
    assert uuid.UUID(int=int(new.removeprefix("2.25."))).version == 8


def test_uid_remapper_accepts_a_custom_root_and_refuses_bad_ones() -> None:
    new = UidRemapper(KEY, root="1.2.826.0.1.3680043.10.543.").remap("1.2.3")
    assert new.startswith("1.2.826.0.1.3680043.10.543.")
    assert is_valid_uid(new)
    with pytest.raises(ValueError, match="root"):
        UidRemapper(KEY, root="1.2.03.")
    with pytest.raises(ValueError, match="root"):
        UidRemapper(KEY, root="1." * 23)
    with pytest.raises(ValueError, match="16 bytes"):
        UidRemapper(b"short")


@pytest.mark.parametrize(
    ("uid", "valid"),
    [
        ("1.2.3", True),
        ("0.1", True),
        ("1.02", False),
        ("1..2", False),
        ("1.2.", False),
        ("1" * 65, False),
    ],
)
def test_uid_syntax(uid: str, valid: bool) -> None:
    assert is_valid_uid(uid) is valid


def test_derive_date_shift_is_stable_negative_and_bounded() -> None:
    shifts = {derive_date_shift(KEY, f"patient-{n}", max_days=30) for n in range(200)}
    assert shifts <= set(range(-30, 0))
    assert len(shifts) > 20
    assert derive_date_shift(KEY, "patient-1") == derive_date_shift(KEY, "patient-1")
    with pytest.raises(ValueError, match="16 bytes"):
        derive_date_shift(b"k", "patient-1")


def test_profile_table_matches_the_cited_edition() -> None:
    assert PROFILE_EDITION == "DICOM PS3.15 2024b, Table E.1-1"
    assert len(BASIC_PROFILE) == 617
    codes = {row.basic for row in BASIC_PROFILE.values()}
    assert codes == {"D", "Z", "X", "U", "X/D", "X/Z", "X/Z/D", "Z/D", "X/Z/U*"}
    assert sum(row.modified_dates for row in BASIC_PROFILE.values()) == 165
    assert BASIC_PROFILE[0x00100010].basic == "Z"
    assert BASIC_PROFILE[0x00100020].basic == "Z/D"
    assert BASIC_PROFILE[0x0020000D].basic == "U"
    assert BASIC_PROFILE[0x00080020].modified_dates
    assert not set(STRICTER_THAN_PROFILE) & set(BASIC_PROFILE)


@pytest.mark.parametrize(
    ("code", "is_sequence", "action"),
    [
        ("X", False, Action.REMOVE),
        ("Z", False, Action.ZERO),
        ("D", False, Action.DUMMY),
        ("U", False, Action.UID),
        ("X/Z", False, Action.ZERO),
        ("X/D", False, Action.DUMMY),
        ("Z/D", False, Action.DUMMY),
        ("X/Z/D", False, Action.DUMMY),
        ("X/Z", True, Action.ZERO),
        ("X/D", True, Action.REMOVE),
        ("X/Z/D", True, Action.ZERO),
        ("X/Z/U*", True, Action.RECURSE),
        ("D", True, Action.DUMMY),
        ("Z", True, Action.ZERO),
    ],
)
def test_combined_codes_resolve_to_one_action(code: str, is_sequence: bool, action: Action) -> None:
    assert resolve_action(code, is_sequence=is_sequence) is action
