"""File uploads in ``multipart/form-data`` bodies, parsed by the standard library's MIME parser.

The parts' own Content-Type headers are ignored on purpose: services judge a file's type from its
content. File names are passed on as sent; services clean them before use. The body has already
passed the transport's size limit (``BodyLimitMiddleware``) when it gets here.
"""

from __future__ import annotations

import email.parser
import email.policy
from dataclasses import dataclass
from email.message import EmailMessage

from medcollab.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class Upload:
    filename: str
    content: bytes


@dataclass(frozen=True, slots=True)
class FormPart:
    """One part of a form: a text field (``filename`` None) or a file."""

    name: str
    filename: str | None
    content: bytes


def form_parts(content_type: str, body: bytes, *, max_parts: int) -> list[FormPart]:
    """The named parts of a ``multipart/form-data`` ``body`` (RFC 7578), in order.

    Raises:
        InvalidInput: no boundary, not a multipart body, or more than ``max_parts`` parts.
    """
    if "boundary=" not in content_type:
        raise InvalidInput("the form could not be read: its Content-Type has no boundary")
    prefix = b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n"
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(prefix + body)
    if not isinstance(message, EmailMessage) or not message.is_multipart():
        raise InvalidInput("the form could not be read")
    parts: list[FormPart] = []
    for count, part in enumerate(message.iter_parts()):
        if count >= max_parts:
            raise InvalidInput(f"the form has more than {max_parts} parts")
        if not isinstance(part, EmailMessage):
            continue
        name = part.get_param("name", header="content-disposition")
        content = part.get_payload(decode=True)
        if not isinstance(name, str) or not isinstance(content, bytes):
            continue
        parts.append(FormPart(name, part.get_filename(), content))
    return parts


def parse_multipart(content_type: str, body: bytes, *, field: str, max_files: int) -> list[Upload]:
    """The file parts of a form named ``field``, in order.

    Raises:
        InvalidInput: the form cannot be read, or has more than ``max_files`` such parts.
    """
    files = [
        Upload(part.filename or "", part.content)
        for part in form_parts(content_type, body, max_parts=max_files + 20)
        if part.name == field
    ]
    if len(files) > max_files:
        raise InvalidInput(f"at most {max_files} '{field}' fields per request")
    return files
