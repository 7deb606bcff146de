"""DICOM imaging: upload into an encrypted ImagingStudy, view, download, share de-identified.

Every path keeps the records chokepoint's rules:

* **The access decision is the repository's.** Storing a study is a FHIR ``create`` (or, when the
  study is already stored, an ``update``) of the patient's ImagingStudy through the caller's
  :class:`RecordRepository`, so the policy decides it and the audit log records it before a byte
  of the files is written. Viewing or downloading reads that ImagingStudy first, through the same
  repository: a caller who may not read it gets 404 exactly as for any record, with the refusal
  audited. Only then are the instances opened.
* **Files are sealed with the patient's data key.** Each DICOM Part 10 file and its extracted
  metadata are sealed with :meth:`KeyService.seal` under associated data binding them to their row,
  study and patient; a row copied to another study or patient fails authentication and is withheld
  (audited as an integrity failure). Crypto-shredding the patient erases the images too.
* **Uploads are checked from their content.** A file must be DICOM by its bytes (the ``DICM``
  marker after the preamble) and parse completely as one instance (not a DICOMDIR); programs
  (including PE/DICOM polyglots), PDFs or images named ``.dcm`` are refused with 415, damaged files
  with 400, oversized ones with 413. One upload holds instances of one study.
* **No UID in the clear.** Study and SOP instance UIDs are looked up by blind index; the UIDs
  themselves live only in the encrypted ImagingStudy and the sealed metadata. A study already filed
  under another patient is refused (409) without saying which.
* **Outside the care relationship, headers are de-identified.** A study shared into a remote
  consultation is delivered to each participant according to the access policy: a participant
  whose own access to the patient's ImagingStudy is permitted (a care relationship, a referral)
  gets the original; anyone else (a consultant invited on the patient's consent or the
  jurisdiction's treatment rule) gets a copy de-identified per DICOM PS3.15's Basic Application
  Level Confidentiality Profile (:mod:`medcollab.deid.dicom`), with UIDs remapped and dates shifted
  consistently across the study by the share's own key. Instances whose pixels may show identifying
  text (burned-in annotation) are withheld from that copy unless the sharer released them
  explicitly, which is recorded.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, NoReturn, cast

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError as DatabaseIntegrityError
from sqlalchemy.orm import Session

from medcollab.access.policy import Action
from medcollab.audit.events import Entity, EventType, Outcome
from medcollab.collaboration.models import ConsultationRecord, ConsultationStatus
from medcollab.collaboration.services import ConsultationService, refuse_programs
from medcollab.crypto.envelope import IntegrityError, length_prefixed
from medcollab.deid.dicom import (
    DicomDeidentifier,
    ImagingMetadata,
    InvalidDicom,
    assess_burned_in,
    derive_date_shift,
    extract_metadata,
    parse_dicom,
    sniff_dicom,
)
from medcollab.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    UnsupportedMediaType,
)
from medcollab.imaging.models import ImagingInstanceRecord, ImagingShareRecord, ImagingStudyRecord
from medcollab.records.repository import (
    RecordIntegrityFailure,
    RecordNotFound,
    RecordRepository,
    StoredResource,
)
from medcollab.runtime import Runtime

#: Files in one upload request.
MAX_FILES_PER_UPLOAD: Final = 500
#: The DICOM ontology FHIR uses for modalities (ImagingStudy.modality, series.modality).
DCM_SYSTEM: Final = "http://dicom.nema.org/resources/ontology/DCM"
_UID_SYSTEM: Final = "urn:dicom:uid"
_SOP_CLASS_SYSTEM: Final = "urn:ietf:rfc:3986"
_UID_CONTEXT: Final = "imaging:study-instance-uid"
_SOP_CONTEXT: Final = "imaging:sop-instance-uid"
_CONTENT_CONTEXT: Final = "imaging:content"
_SHARE_KEY_BYTES: Final = 32


class WithheldInstance(PermissionDenied):
    """The image may show identifying text and the sharer did not release it outside the team."""

    code = "burned_in_withheld"
    keeps_writes = True


class _ImagingNotFound(NotFound):
    """A refused look at a share looks like a missing one; its audit event is kept."""

    keeps_writes = True


# Views -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InstanceView:
    id: uuid.UUID
    series_uid: str | None
    sop_instance_uid: str | None
    sop_class_uid: str | None
    modality: str | None
    series_number: int | None
    instance_number: int | None
    number_of_frames: int
    size: int
    burned_in_risk: bool
    burned_in_reasons: tuple[str, ...]
    uploaded_at: datetime


@dataclass(frozen=True, slots=True)
class StudyView:
    id: uuid.UUID
    patient_id: str
    #: The FHIR ImagingStudy as the caller may see it (masks applied).
    imaging_study: dict[str, Any]
    instances: tuple[InstanceView, ...]


@dataclass(frozen=True, slots=True)
class UploadView:
    study: StudyView
    #: Instances stored by this request.
    stored: tuple[uuid.UUID, ...]
    #: Instances that were already stored with exactly this content (a repeated upload).
    unchanged: tuple[uuid.UUID, ...]
    #: Whether the DICOM PatientID matches an identifier of the FHIR Patient: ``matched``,
    #: ``mismatch`` (check that the images belong to this patient) or ``unknown``.
    patient_match: str
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SharedInstanceView:
    """What a consultation participant sees of a shared instance: nothing identifying."""

    id: uuid.UUID
    modality: str | None
    series_number: int | None
    instance_number: int | None
    number_of_frames: int
    burned_in_risk: bool
    #: Outside the care relationship this instance is not released (burned-in risk).
    withheld: bool


@dataclass(frozen=True, slots=True)
class ShareView:
    id: uuid.UUID
    consultation_id: uuid.UUID
    study_id: uuid.UUID
    shared_by_org: str
    created_at: datetime
    release_flagged: bool
    #: Whether the caller receives originals (inside the care relationship) or de-identified copies.
    deidentified_for_me: bool
    instances: tuple[SharedInstanceView, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class DicomFile:
    """A DICOM file on its way out, with what the caller must know about it."""

    instance_id: uuid.UUID
    content: bytes
    deidentified: bool
    burned_in_risk: bool


@dataclass(frozen=True, slots=True)
class _Parsed:
    content: bytes
    #: Blind indexes of the SOP Instance UID and of the file's digest.
    sop_index: str
    content_index: str
    metadata: ImagingMetadata
    burned_in_risk: bool
    burned_in_reasons: tuple[str, ...]
    patient_identifier: str | None


# The service -------------------------------------------------------------------------------------


def _aad(kind: bytes, row_id: uuid.UUID, study_id: uuid.UUID, patient_id: str) -> bytes:
    return length_prefixed(
        b"medcollab/imaging/v1", kind, row_id.bytes, study_id.bytes, patient_id.encode("utf-8")
    )


def _uuid_or_404(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(f"no such {what}") from None


class ImagingService:
    """Upload, view, download and share DICOM studies (see the module docstring)."""

    def __init__(
        self, *, repo: RecordRepository, runtime: Runtime, max_instance_bytes: int
    ) -> None:
        self._repo = repo
        self._runtime = runtime
        self._db: Session = repo.session
        self._ctx = repo.ctx
        self._keys = repo.keys
        self._max_instance_bytes = max_instance_bytes
        self._consultations: ConsultationService | None = None

    # Plumbing ----------------------------------------------------------------------------------

    def _now(self) -> datetime:
        return self._repo.clock.now()

    def _seal(
        self, kind: bytes, row_id: uuid.UUID, study: ImagingStudyRecord, data: bytes
    ) -> bytes:
        return self._keys.seal(
            "patient", study.patient_id, data, aad=_aad(kind, row_id, study.id, study.patient_id)
        )

    def _unseal(
        self, kind: bytes, row_id: uuid.UUID, study: ImagingStudyRecord, blob: bytes
    ) -> bytes:
        try:
            return self._keys.unseal(
                "patient",
                study.patient_id,
                blob,
                aad=_aad(kind, row_id, study.id, study.patient_id),
            )
        except IntegrityError:
            self._repo.record_event(
                EventType.RECORD_INTEGRITY_FAILURE,
                Entity(study.patient_id, "ImagingStudy", str(study.id)),
                (f"sealed-imaging-{kind.decode()}-failed-authentication", f"row={row_id}"),
                outcome=Outcome.MAJOR_FAILURE,
            )
            raise RecordIntegrityFailure(
                "a stored image failed its integrity check; it has been withheld and the "
                "security officer alerted"
            ) from None

    def _blind(self, value: str, context: str) -> str:
        return self._keys.blind_index(value, context=context)

    def _require_user(self) -> None:
        if self._ctx.user_id is None or self._ctx.org_id is None:
            raise PermissionDenied("imaging needs a signed-in user acting for an organisation")

    # Upload ------------------------------------------------------------------------------------

    def _parse(self, content: bytes) -> _Parsed:
        if len(content) > self._max_instance_bytes:
            raise PayloadTooLarge(
                f"a DICOM file may have at most {self._max_instance_bytes} bytes; "
                f"this one has {len(content)}"
            )
        if not sniff_dicom(content):
            raise UnsupportedMediaType(
                "the file is not DICOM: imaging uploads take DICOM Part 10 files (the 'DICM' "
                "marker after the 128-byte preamble is missing)",
                hint="PDFs and photographs go to a consultation as attachments",
            )
        # A program hidden in the free-form preamble (a PE/DICOM polyglot) is refused. The file
        # name is not used: the content decides, and the name is not stored.
        refuse_programs(content)
        dataset = parse_dicom(content, max_bytes=self._max_instance_bytes)
        metadata = extract_metadata(dataset)
        # Some writers keep the SOP class and instance only in the file meta information.
        meta = dataset.file_meta
        metadata["sop_class_uid"] = metadata["sop_class_uid"] or _text(
            meta.get("MediaStorageSOPClassUID")
        )
        metadata["sop_instance_uid"] = metadata["sop_instance_uid"] or _text(
            meta.get("MediaStorageSOPInstanceUID")
        )
        for key in ("study_instance_uid", "series_instance_uid", "sop_instance_uid"):
            if not metadata[key]:
                raise InvalidDicom(
                    f"the DICOM file has no {key.replace('_', ' ')}; it cannot be filed in a study"
                )
        assessment = assess_burned_in(dataset)
        identifier = _text(dataset.get("PatientID"))
        return _Parsed(
            content=content,
            sop_index=self._blind(cast("str", metadata["sop_instance_uid"]), _SOP_CONTEXT),
            content_index=self._blind(hashlib.sha256(content).hexdigest(), _CONTENT_CONTEXT),
            metadata=metadata,
            burned_in_risk=assessment.risk,
            burned_in_reasons=assessment.reasons,
            patient_identifier=identifier,
        )

    def upload(self, patient_id: str, files: Sequence[tuple[str, bytes]]) -> UploadView:
        """Store DICOM instances of one study for ``patient_id``; see the module docstring.

        Every file is checked, and the policy decides the ImagingStudy write, before anything is
        sealed or stored: a refused or invalid upload leaves nothing behind but its audit event.
        """
        self._require_user()
        if not files:
            raise InvalidInput("the upload has no file")
        if len(files) > MAX_FILES_PER_UPLOAD:
            raise InvalidInput(f"at most {MAX_FILES_PER_UPLOAD} files per upload")
        parsed = [self._parse(content) for _name, content in files]
        study_uids = {p.metadata["study_instance_uid"] for p in parsed}
        if len(study_uids) != 1:
            raise InvalidInput(
                f"the files belong to {len(study_uids)} different studies; upload one study at a time"
            )
        now = self._now()
        study, current = self._study_for_upload(patient_id, cast("str", study_uids.pop()), now)
        existing = self._instances(study) if current is not None else []
        new, unchanged = self._sort_out(existing, parsed)
        resource = imaging_study_resource(
            patient_id,
            _distinct(
                [self._metadata(study, row)[0] for row in existing] + [p.metadata for p in new]
            ),
        )
        if current is None:
            # The policy's decision on creating the ImagingStudy comes before any row is added.
            current = self._repo.create(resource, resource_id=str(study.id))
            self._db.add(study)
        elif new:
            current = self._repo.update("ImagingStudy", str(study.id), resource)
            study.updated_at = now
        stored = [self._sealed_instance(study, item, now) for item in new]
        try:
            self._db.flush()  # The study row first: the instances refer to it.
            self._db.add_all(stored)
            self._db.flush()
        except DatabaseIntegrityError:
            # Two uploads of the same study raced and the other won; this whole request is
            # rolled back (no audit event is kept from a failed flush).
            raise Conflict("the study is being uploaded by someone else; retry") from None
        match, warnings = self._patient_match(patient_id, parsed)
        flagged = sum(1 for row in stored if row.burned_in_risk)
        self._repo.record_event(
            EventType.IMAGING_UPLOADED,
            Entity(patient_id, "ImagingStudy", str(study.id)),
            (
                f"stored={len(stored)}",
                f"unchanged={len(unchanged)}",
                f"burned-in-risk={flagged}",
                f"patient-match={match}",
            ),
        )
        if flagged:
            warnings.append(
                f"{flagged} image(s) may show burned-in identifying text; they are withheld "
                "from de-identified copies unless released when shared"
            )
        return UploadView(
            study=self._view(study, current),
            stored=tuple(row.id for row in stored),
            unchanged=tuple(unchanged),
            patient_match=match,
            warnings=tuple(warnings),
        )

    def _study_for_upload(
        self, patient_id: str, study_uid: str, now: datetime
    ) -> tuple[ImagingStudyRecord, StoredResource | None]:
        """The stored study with this UID (read through the repository, which is the access
        check for adding to it), or a new, not yet added row and None."""
        index = self._blind(study_uid, _UID_CONTEXT)
        study = self._db.scalar(
            select(ImagingStudyRecord).where(ImagingStudyRecord.study_uid_index == index)
        )
        if study is None:
            new = ImagingStudyRecord(
                id=uuid.uuid4(),
                patient_id=patient_id,
                study_uid_index=index,
                org_id=self._ctx.org_id,
                created_at=now,
                updated_at=now,
            )
            return new, None
        if study.patient_id != patient_id:
            decision = self._repo.explain(Action.CREATE, "ImagingStudy", patient_id)
            if not decision.permitted:
                # Someone who may not file images for this patient learns nothing, not even that
                # the study is stored for somebody else: the repository's own answer.
                self._repo.record_event(
                    EventType.FHIR_CREATE,
                    Entity(patient_id, "ImagingStudy"),
                    decision.reasons,
                    outcome=Outcome.MINOR_FAILURE,
                )
                raise RecordNotFound(f"Patient/{patient_id} not found")
            self._repo.record_event(
                EventType.IMAGING_UPLOADED,
                Entity(patient_id, "ImagingStudy"),
                ("study-filed-under-another-patient",),
                outcome=Outcome.MINOR_FAILURE,
            )
            raise _UploadConflict(
                "this study is already stored for another patient; check that the images belong "
                "to this patient"
            )
        return study, self._stored_study(study)

    def _sort_out(
        self, existing: Sequence[ImagingInstanceRecord], parsed: Sequence[_Parsed]
    ) -> tuple[list[_Parsed], list[uuid.UUID]]:
        """The files to store, and the ids of those already stored with the same content."""
        by_sop = {row.sop_uid_index: row for row in existing}
        new: list[_Parsed] = []
        unchanged: list[uuid.UUID] = []
        seen: set[str] = set()
        for item in parsed:
            if item.sop_index in seen:
                raise InvalidInput("the upload holds the same SOP instance twice")
            seen.add(item.sop_index)
            previous = by_sop.get(item.sop_index)
            if previous is None:
                new.append(item)
            elif previous.content_index == item.content_index:
                unchanged.append(previous.id)
            else:
                raise _UploadConflict(
                    "an instance with this SOP Instance UID is already stored with other "
                    "content; a corrected image needs a new SOP Instance UID"
                )
        return new, unchanged

    def _sealed_instance(
        self, study: ImagingStudyRecord, item: _Parsed, now: datetime
    ) -> ImagingInstanceRecord:
        row = ImagingInstanceRecord(
            id=uuid.uuid4(),
            study_id=study.id,
            sop_uid_index=item.sop_index,
            content_index=item.content_index,
            uploaded_by=self._ctx.user_id,
            uploader_org_id=self._ctx.org_id,
            created_at=now,
            size=len(item.content),
            burned_in_risk=item.burned_in_risk,
        )
        meta = {"metadata": dict(item.metadata), "burned_in": list(item.burned_in_reasons)}
        row.metadata_enc = self._seal(b"metadata", row.id, study, json.dumps(meta).encode())
        row.content_enc = self._seal(b"content", row.id, study, item.content)
        return row

    def _patient_match(self, patient_id: str, parsed: Sequence[_Parsed]) -> tuple[str, list[str]]:
        """Compare the DICOM PatientID with the FHIR Patient's identifiers (a wrong-patient check)."""
        found = {p.patient_identifier for p in parsed if p.patient_identifier}
        if not found:
            return "unknown", ["the DICOM files carry no PatientID to compare with the record"]
        patient = self._repo.read("Patient", patient_id).body or {}
        values = {
            str(i.get("value")).strip()
            for i in patient.get("identifier") or []
            if isinstance(i, dict) and i.get("value")
        }
        if not values:
            return "unknown", ["the patient's record has no identifier to compare with"]
        if found <= values:
            return "matched", []
        return "mismatch", [
            "the DICOM PatientID matches none of the patient's identifiers: check that these "
            "images belong to this patient"
        ]

    # Reading ---------------------------------------------------------------------------------

    def _study_row(self, study_id: str) -> ImagingStudyRecord:
        study = self._db.get(ImagingStudyRecord, _uuid_or_404(study_id, "imaging study"))
        if study is None:
            # The same answer and audit as the repository's for a missing record.
            self._repo.read("ImagingStudy", study_id)
            raise NotFound("no such imaging study")
        return study

    def _stored_study(self, study: ImagingStudyRecord) -> StoredResource:
        """The ImagingStudy through the repository: the policy decides, the read is audited."""
        stored = self._repo.read("ImagingStudy", str(study.id))
        if stored.patient_id != study.patient_id:
            # The resource was moved to another patient through the FHIR API; the images stay
            # sealed to the patient they were uploaded for and are not released under the other.
            raise Conflict(
                "the ImagingStudy now names another patient than its images; they are withheld "
                "until the record is corrected"
            )
        return stored

    def _instances(self, study: ImagingStudyRecord) -> list[ImagingInstanceRecord]:
        return list(
            self._db.scalars(
                select(ImagingInstanceRecord)
                .where(ImagingInstanceRecord.study_id == study.id)
                .order_by(ImagingInstanceRecord.created_at, ImagingInstanceRecord.id)
            )
        )

    def _metadata(
        self, study: ImagingStudyRecord, row: ImagingInstanceRecord
    ) -> tuple[ImagingMetadata, tuple[str, ...]]:
        data = json.loads(self._unseal(b"metadata", row.id, study, row.metadata_enc))
        return cast("ImagingMetadata", data["metadata"]), tuple(data["burned_in"])

    def _view(self, study: ImagingStudyRecord, stored: StoredResource) -> StudyView:
        instances = []
        for row in self._instances(study):
            meta, reasons = self._metadata(study, row)
            instances.append(
                InstanceView(
                    id=row.id,
                    series_uid=meta["series_instance_uid"],
                    sop_instance_uid=meta["sop_instance_uid"],
                    sop_class_uid=meta["sop_class_uid"],
                    modality=meta["modality"],
                    series_number=meta["series_number"],
                    instance_number=meta["instance_number"],
                    number_of_frames=meta["number_of_frames"],
                    size=row.size,
                    burned_in_risk=row.burned_in_risk,
                    burned_in_reasons=reasons,
                    uploaded_at=row.created_at,
                )
            )
        return StudyView(
            id=study.id,
            patient_id=study.patient_id,
            imaging_study=dict(stored.body or {}),
            instances=tuple(instances),
        )

    def study(self, study_id: str) -> StudyView:
        """The study's ImagingStudy and its instances' metadata (the read is audited)."""
        self._require_user()
        study = self._study_row(study_id)
        return self._view(study, self._stored_study(study))

    def studies(self, patient_id: str) -> list[dict[str, Any]]:
        """The patient's ImagingStudy resources the caller may see (a FHIR search, audited)."""
        self._require_user()
        page = self._repo.search(
            "ImagingStudy",
            {"patient": [f"Patient/{patient_id}"]},
            count=self._repo.settings.fhir_max_page_size,
        )
        return [dict(entry.body or {}) for entry in page.entries]

    def _instance_row(self, study: ImagingStudyRecord, instance_id: str) -> ImagingInstanceRecord:
        row = self._db.get(ImagingInstanceRecord, _uuid_or_404(instance_id, "instance"))
        if row is None or row.study_id != study.id:
            raise NotFound("no such instance in this study")
        return row

    def download(self, study_id: str, instance_id: str) -> DicomFile:
        """One original DICOM file, for a caller the policy lets read the ImagingStudy."""
        self._require_user()
        study = self._study_row(study_id)
        self._stored_study(study)
        row = self._instance_row(study, instance_id)
        content = self._unseal(b"content", row.id, study, row.content_enc)
        self._repo.record_event(
            EventType.IMAGING_DOWNLOADED,
            Entity(study.patient_id, "ImagingStudy", str(study.id)),
            (f"instance={row.id}", f"size={row.size}"),
        )
        return DicomFile(row.id, content, deidentified=False, burned_in_risk=row.burned_in_risk)

    # Sharing into a consultation -------------------------------------------------------------

    def _consultation(self) -> ConsultationService:
        if self._consultations is None:
            self._consultations = ConsultationService(repo=self._repo, runtime=self._runtime)
        return self._consultations

    def share(self, study_id: str, consult_id: str, *, release_flagged: bool = False) -> ShareView:
        """Share a study the caller may read into a consultation about the same patient."""
        self._require_user()
        study = self._study_row(study_id)
        self._stored_study(study)
        consult, _me = self._consultation().participation(consult_id)
        if consult.status is not ConsultationStatus.OPEN:
            raise Conflict(f"the consultation is {consult.status.value}; it takes no new content")
        if consult.patient_id != study.patient_id:
            raise InvalidInput("the study and the consultation are about different patients")
        existing = self._db.scalar(
            select(ImagingShareRecord).where(
                ImagingShareRecord.study_id == study.id,
                ImagingShareRecord.consult_id == consult.id,
            )
        )
        if existing is not None:
            if release_flagged and not existing.release_flagged:
                # Released after review: flagged images now go out de-identified too.
                existing.release_flagged = True
                self._repo.record_event(
                    EventType.IMAGING_SHARED,
                    Entity(study.patient_id, "ImagingStudy", str(study.id)),
                    (f"consultation={consult.id}", "release-flagged=true", "released-after-review"),
                )
            return self._share_view(existing, study, consult)
        share = ImagingShareRecord(
            id=uuid.uuid4(),
            study_id=study.id,
            consult_id=consult.id,
            shared_by=self._ctx.user_id,
            sharer_org_id=self._ctx.org_id,
            created_at=self._now(),
            release_flagged=release_flagged,
            key_enc=b"",
        )
        share.key_enc = self._seal(
            b"share-key", share.id, study, secrets.token_bytes(_SHARE_KEY_BYTES)
        )
        self._db.add(share)
        self._db.flush()
        flagged = sum(1 for row in self._instances(study) if row.burned_in_risk)
        self._repo.record_event(
            EventType.IMAGING_SHARED,
            Entity(study.patient_id, "ImagingStudy", str(study.id)),
            (
                f"consultation={consult.id}",
                f"burned-in-risk={flagged}",
                f"release-flagged={str(release_flagged).lower()}",
            ),
        )
        return self._share_view(share, study, consult)

    def _inside_care(self, patient_id: str) -> bool:
        """Whether the caller's own access lets them read the patient's ImagingStudy."""
        return self._repo.explain(Action.READ, "ImagingStudy", patient_id).permitted

    def _share_view(
        self, share: ImagingShareRecord, study: ImagingStudyRecord, consult: ConsultationRecord
    ) -> ShareView:
        outside = not self._inside_care(study.patient_id)
        instances = []
        for row in self._instances(study):
            meta, _reasons = self._metadata(study, row)
            instances.append(
                SharedInstanceView(
                    id=row.id,
                    modality=meta["modality"],
                    series_number=meta["series_number"],
                    instance_number=meta["instance_number"],
                    number_of_frames=meta["number_of_frames"],
                    burned_in_risk=row.burned_in_risk,
                    withheld=outside and row.burned_in_risk and not share.release_flagged,
                )
            )
        return ShareView(
            id=share.id,
            consultation_id=consult.id,
            study_id=study.id,
            shared_by_org=self._consultation().org_code(share.sharer_org_id),
            created_at=share.created_at,
            release_flagged=share.release_flagged,
            deidentified_for_me=outside,
            instances=tuple(instances),
        )

    def shares(self, consult_id: str) -> list[ShareView]:
        """The studies shared into a consultation the caller takes part in (audited)."""
        consult, _me = self._consultation().participation(consult_id)
        rows = self._db.scalars(
            select(ImagingShareRecord)
            .where(ImagingShareRecord.consult_id == consult.id)
            .order_by(ImagingShareRecord.created_at, ImagingShareRecord.id)
        ).all()
        views = []
        for share in rows:
            study = self._db.get(ImagingStudyRecord, share.study_id)
            if study is not None:
                views.append(self._share_view(share, study, consult))
        self._repo.record_event(
            EventType.CONSULTATION_READ,
            Entity(consult.patient_id, "Consultation", str(consult.id)),
            (f"imaging-shares={len(views)}",),
        )
        return views

    def shared_file(self, consult_id: str, share_id: str, instance_id: str) -> DicomFile:
        """A shared instance: the original inside the care relationship, else de-identified."""
        consult, _me = self._consultation().participation(consult_id)
        share = self._db.get(ImagingShareRecord, _uuid_or_404(share_id, "shared study"))
        if share is None or share.consult_id != consult.id:
            self._refuse(consult, "no-such-share")
        study = self._db.get(ImagingStudyRecord, share.study_id)
        if study is None:
            self._refuse(consult, "study-gone")
        row = self._instance_row(study, instance_id)
        if self._inside_care(study.patient_id):
            return self.download(str(study.id), str(row.id))
        entity = Entity(study.patient_id, "ImagingStudy", str(study.id))
        if row.burned_in_risk and not share.release_flagged:
            self._repo.record_event(
                EventType.IMAGING_DEIDENTIFIED_DOWNLOADED,
                entity,
                (f"instance={row.id}", f"share={share.id}", "withheld-burned-in-risk"),
                outcome=Outcome.MINOR_FAILURE,
            )
            raise WithheldInstance(
                "this image may show identifying text burned into its pixels; it is released "
                "outside the care team only if the clinician who shared it releases it"
            )
        key = self._unseal(b"share-key", share.id, study, share.key_enc)
        deidentifier = DicomDeidentifier(
            key=key,
            date_shift_days=derive_date_shift(key, study.patient_id),
            max_bytes=max(self._max_instance_bytes, row.size),
        )
        result = deidentifier.deidentify(self._unseal(b"content", row.id, study, row.content_enc))
        self._repo.record_event(
            EventType.IMAGING_DEIDENTIFIED_DOWNLOADED,
            entity,
            (
                f"instance={row.id}",
                f"share={share.id}",
                f"consultation={consult.id}",
                "profile=PS3.15-basic+retain-longitudinal-modified-dates",
            ),
        )
        return DicomFile(row.id, result.data, deidentified=True, burned_in_risk=row.burned_in_risk)

    def _refuse(self, consult: ConsultationRecord, reason: str) -> NoReturn:
        self._repo.record_event(
            EventType.CONSULTATION_ACCESS_DENIED,
            Entity(consult.patient_id, "Consultation", str(consult.id)),
            (reason,),
            outcome=Outcome.MINOR_FAILURE,
        )
        raise _ImagingNotFound("no such shared study")


class _UploadConflict(Conflict):
    """A refused upload keeps its audit event."""

    keeps_writes = True


# The ImagingStudy --------------------------------------------------------------------------------


def _text(value: object) -> str | None:
    """A keyword lookup's value (``Dataset.get("PatientID")``) as text, or None if empty."""
    text = str(value or "").strip(" \x00")
    return text or None


def _distinct(metadata: Iterable[ImagingMetadata]) -> list[ImagingMetadata]:
    seen: dict[str, ImagingMetadata] = {}
    for item in metadata:
        seen.setdefault(cast("str", item["sop_instance_uid"]), item)
    return list(seen.values())


def _modality(code: str) -> dict[str, str]:
    return {"system": DCM_SYSTEM, "code": code}


def imaging_study_resource(patient_id: str, instances: Sequence[ImagingMetadata]) -> dict[str, Any]:
    """A FHIR R4 ImagingStudy describing ``instances`` (all of one study) of ``patient_id``."""
    first = instances[0]
    series: dict[str, list[ImagingMetadata]] = {}
    for item in instances:
        series.setdefault(cast("str", item["series_instance_uid"]), []).append(item)
    modalities = sorted({m["modality"] for m in instances if m["modality"]})
    description = next((m["study_description"] for m in instances if m["study_description"]), None)
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "status": "available",
        "subject": {"reference": f"Patient/{patient_id}"},
        "identifier": [{"system": _UID_SYSTEM, "value": f"urn:oid:{first['study_instance_uid']}"}],
        "modality": [_modality(code) for code in modalities],
        "numberOfSeries": len(series),
        "numberOfInstances": len(instances),
        "series": [_series(uid, items) for uid, items in sorted(series.items(), key=_series_order)],
    }
    started = next((m["study_date"] for m in instances if m["study_date"]), None)
    if started:
        resource["started"] = started
    if description:
        resource["description"] = description[:1024]
    return resource


def _series_order(entry: tuple[str, list[ImagingMetadata]]) -> tuple[int, str]:
    number = entry[1][0]["series_number"]
    return (number if number is not None else 1 << 30, entry[0])


def _series(uid: str, items: list[ImagingMetadata]) -> dict[str, Any]:
    first = items[0]
    series: dict[str, Any] = {
        "uid": uid,
        "modality": _modality(first["modality"] or "OT"),
        "numberOfInstances": len(items),
        "instance": [
            {
                "uid": item["sop_instance_uid"],
                "sopClass": {
                    "system": _SOP_CLASS_SYSTEM,
                    "code": f"urn:oid:{item['sop_class_uid']}",
                },
                **(
                    {"number": item["instance_number"]}
                    if item["instance_number"] is not None and item["instance_number"] >= 0
                    else {}
                ),
            }
            for item in sorted(
                items,
                key=lambda m: (
                    m["instance_number"] if m["instance_number"] is not None else 1 << 30,
                    m["sop_instance_uid"] or "",
                ),
            )
        ],
    }
    if first["series_number"] is not None and first["series_number"] >= 0:
        series["number"] = first["series_number"]
    if first["series_description"]:
        series["description"] = first["series_description"][:1024]
    if first["body_site"]:
        series["bodySite"] = {"display": first["body_site"][:64]}
    return series


__all__ = [
    "MAX_FILES_PER_UPLOAD",
    "DicomFile",
    "ImagingService",
    "InstanceView",
    "ShareView",
    "SharedInstanceView",
    "StudyView",
    "UploadView",
    "WithheldInstance",
    "imaging_study_resource",
]
