"""``medcollab``: the operator's command line.

Every command that changes state acts as the visibly named system actor ``system:cli`` and is
audited. Errors print one line naming the problem and exit non-zero; tracebacks are never shown.
"""

from __future__ import annotations

import os
import sys
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from medcollab.config import Mode, Settings
from medcollab.errors import ConfigurationError, InvalidInput, MedcollabError
from medcollab.identity.models import FhirLinkKind, OrgKind
from medcollab.identity.services import UserService, operator_agent
from medcollab.kernel.permissions import Role
from medcollab.runtime import Runtime

app = typer.Typer(
    name="medcollab",
    help="medcollab: secure medical collaboration platform.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
org_app = typer.Typer(help="Organisations.", no_args_is_help=True)
user_app = typer.Typer(help="User accounts.", no_args_is_help=True)
app.add_typer(org_app, name="org")
app.add_typer(user_app, name="user")

out = Console()
# A diagnosis stays on one line whatever the terminal's width (Rich wraps at 80 columns when it
# writes to a pipe or a log) and is printed as it is, without :emoji: codes.
err = Console(stderr=True, soft_wrap=True, emoji=False)

EXIT_ERROR = 2
EXIT_UNEXPECTED = 1


def load_settings(**overrides: object) -> Settings:
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(_setting_problem(e["loc"], e["type"], e["msg"]) for e in exc.errors())
        raise ConfigurationError(f"invalid configuration: {problems}") from None


def _setting_problem(loc: tuple[int | str, ...], kind: str, message: str) -> str:
    name = "_".join(str(p) for p in loc)
    if kind == "extra_forbidden":
        # Unknown MEDCOLLAB_* variables are ignored, so an unknown key comes from the TOML file.
        return (
            f"{name}: unknown setting in the configuration file "
            "(MEDCOLLAB_CONFIG, default ./medcollab.toml)"
        )
    return f"MEDCOLLAB_{name.upper()}: {message}"


def _print_table(table: Table) -> None:
    """Print ``table`` with its cells as plain text and, when stdout is not a terminal, whole.

    Cells hold names that people typed, so they are never read as Rich markup (``[/x]`` in an
    organisation's name would crash the listing) or ``:emoji:`` codes. Without a terminal to ask,
    Rich fits a table to 80 columns and cuts ids, usernames and roles with "…"; a script or a log
    that reads ``medcollab user list`` needs them whole.
    """
    plain = Console(file=out.file, markup=False, emoji=False)
    if not plain.is_terminal:
        needed = Measurement.get(plain, plain.options.update_width(10_000), table).maximum
        plain.width = max(plain.width, needed)
    plain.print(table)


@contextmanager
def _runtime() -> Iterator[Runtime]:
    from medcollab.deployment import schema_is_current  # noqa: PLC0415 - keeps --help fast.

    settings = load_settings()
    if not schema_is_current(settings):
        raise ConfigurationError(
            "the database is not initialised or its schema is out of date",
            hint="run `medcollab init`",
        )
    runtime = Runtime.from_settings(settings)
    try:
        yield runtime
    finally:
        runtime.close()


@app.command()
def init() -> None:
    """Create the data directory, application secret, TLS certificate and database schema."""
    from medcollab.deployment import initialise  # noqa: PLC0415

    report = initialise(load_settings())
    # soft_wrap: a long path stays on its line, whole, for whoever copies it or reads it in a log.
    out.print(f"data directory   {report.data_dir.resolve()}", soft_wrap=True)
    out.print(f"secret           {'created' if report.secret_created else 'kept'}")
    out.print(f"TLS certificate  {'created' if report.certificate_created else 'kept'}")
    out.print(f"database         {report.database}, schema at the newest migration")


@app.command()
def serve() -> None:
    """Serve the platform over HTTPS."""
    from medcollab.server import serve as run_server  # noqa: PLC0415

    # Refused before anything uses the secret, so that every problem is named at once.
    load_settings().check_safe_to_serve()
    with _runtime() as runtime:
        run_server(runtime)


@app.command()
def demo() -> None:
    """Initialise a demo deployment with synthetic data and serve it (reuses an existing one)."""
    from medcollab.demo import run_demo  # noqa: PLC0415

    run_demo(load_settings(mode=Mode.DEMO), out)


# Organisations ------------------------------------------------------------------------------------


@org_app.command("create")
def org_create(
    code: Annotated[str, typer.Option(help="Short stable code, e.g. SH-RJ.")],
    name: Annotated[str, typer.Option(help="Display name.")],
    kind: Annotated[OrgKind, typer.Option(help="Kind of organisation.")],
    region: Annotated[str, typer.Option(help="Region code, e.g. CN, HK, US, EU.")],
    jurisdiction: Annotated[
        str | None, typer.Option(help="Override the deployment's profile: PIPL, GDPR or HIPAA.")
    ] = None,
) -> None:
    """Create an organisation."""
    with _runtime() as runtime, runtime.database.unit_of_work() as session:
        org = UserService(session=session, runtime=runtime).create_org(
            code=code,
            name=name,
            kind=kind,
            region=region,
            jurisdiction=jurisdiction,
            agent=operator_agent(),
        )
        out.print(f"{org.id}\t{org.code}")


@org_app.command("list")
def org_list() -> None:
    """List organisations."""
    with _runtime() as runtime, runtime.database.unit_of_work() as session:
        table = Table("code", "name", "kind", "region", "jurisdiction", "id")
        for org in UserService(session=session, runtime=runtime).list_orgs():
            table.add_row(
                org.code, org.name, org.kind.value, org.region, org.jurisdiction or "-", str(org.id)
            )
        _print_table(table)


# Users --------------------------------------------------------------------------------------------


def _parse_grant(text: str) -> tuple[str, Role]:
    org, sep, role = text.partition(":")
    if not sep or not org or not role:
        raise InvalidInput(f"--grant {text!r}: expected ORG:ROLE, e.g. SH-RJ:physician")
    try:
        return org, Role(role.strip().lower())
    except ValueError:
        valid = ", ".join(r.value for r in Role)
        raise InvalidInput(f"--grant {text!r}: unknown role {role!r}; roles are {valid}") from None


def _cli_links(
    patient: str | None, practitioner: str | None, guardian_of: list[str] | None
) -> list[tuple[FhirLinkKind, str]]:
    links = [(FhirLinkKind.GUARDIAN, ward) for ward in guardian_of or []]
    if patient:
        links.append((FhirLinkKind.PATIENT, patient))
    if practitioner:
        links.append((FhirLinkKind.PRACTITIONER, practitioner))
    return links


def _read_password_stdin() -> str:
    data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("the password on standard input is not valid UTF-8") from None
    # Strip exactly one trailing newline (from echo or a here-string); keep every other character.
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise InvalidInput("no password on standard input")
    return text


@user_app.command("create")
def user_create(
    username: Annotated[str, typer.Option(help="Login name.")],
    display_name: Annotated[str, typer.Option(help="Name shown to other users.")],
    grant: Annotated[list[str], typer.Option(help="ORG:ROLE, repeatable (e.g. SH-RJ:physician).")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
    patient: Annotated[
        str | None, typer.Option(help="Link a patient account to its FHIR Patient id.")
    ] = None,
    practitioner: Annotated[
        str | None, typer.Option(help="Link a clinician to its FHIR Practitioner id.")
    ] = None,
    guardian_of: Annotated[
        list[str] | None, typer.Option(help="FHIR Patient id of a ward (repeatable).")
    ] = None,
) -> None:
    """Create a user; prints the user id and, for staff, the otpauth:// URI to enrol MFA."""
    if not password_stdin:
        raise InvalidInput(
            "a password is required",
            hint="pipe it in with --password-stdin; a password on the command line leaks into shell history",
        )
    grants = [_parse_grant(g) for g in grant]
    password = _read_password_stdin()
    with _runtime() as runtime, runtime.database.unit_of_work() as session:
        created = UserService(session=session, runtime=runtime).create_user(
            username=username,
            display_name=display_name,
            password=password,
            grants=grants,
            agent=operator_agent(),
            links=_cli_links(patient, practitioner, guardian_of),
        )
        out.print(str(created.user.id))
        if created.otpauth_uri:
            out.print(created.otpauth_uri, soft_wrap=True)


@user_app.command("list")
def user_list(
    org: Annotated[str | None, typer.Option(help="Only users of this organisation.")] = None,
) -> None:
    """List users with their roles, MFA status and lockouts."""
    with _runtime() as runtime, runtime.database.unit_of_work() as session:
        service = UserService(session=session, runtime=runtime)
        scope = frozenset({service.org_by_code(org).id}) if org else None
        table = Table("username", "display name", "roles", "MFA", "status", "id")
        for view in service.list_users(scope):
            roles = ", ".join(f"{g.org_code}:{g.role.value}" for g in view.grants)
            status = "disabled" if view.disabled else ("locked" if view.locked_until else "active")
            table.add_row(
                view.username,
                view.display_name,
                roles,
                "yes" if view.mfa_enabled else "no",
                status,
                str(view.id),
            )
        _print_table(table)


def _user_id(service: UserService, user: str) -> uuid.UUID:
    try:
        return uuid.UUID(user)
    except ValueError:
        return service.user_by_username(user).id


@user_app.command("disable")
def user_disable(user: Annotated[str, typer.Argument(help="Username or id.")]) -> None:
    """Disable a user and end all of their sessions."""
    with _runtime() as runtime, runtime.database.unit_of_work() as session:
        service = UserService(session=session, runtime=runtime)
        disabled = service.disable_user(_user_id(service, user), agent=operator_agent())
        out.print(f"disabled {disabled.username}")


@user_app.command("reset-mfa")
def user_reset_mfa(user: Annotated[str, typer.Argument(help="Username or id.")]) -> None:
    """Forget a user's authenticator and recovery codes; prints a new otpauth:// URI."""
    with _runtime() as runtime, runtime.database.unit_of_work() as session:
        service = UserService(session=session, runtime=runtime)
        reset = service.reset_mfa(_user_id(service, user), agent=operator_agent())
        out.print(reset.otpauth_uri or "", soft_wrap=True)


# Records -------------------------------------------------------------------------------------------


@app.command("import")
def import_fhir(
    paths: Annotated[list[Path], typer.Argument(help="FHIR JSON files or folders of them.")],
    org: Annotated[str, typer.Option(help="Code of the organisation that holds the data.")],
) -> None:
    """Import FHIR R4 resources and Bundles; idempotent; failing files are reported and skipped.

    Exits 3 when some files failed (the others were imported)."""
    from medcollab.records.cli import import_command  # noqa: PLC0415

    with _runtime() as runtime:
        code = import_command(runtime, paths, org, out)
    if code:
        raise typer.Exit(code)


@app.command("export")
def export_fhir(
    patient: Annotated[str, typer.Option(help="FHIR Patient id.")],
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Write the Bundle here (mode 0600).")
    ] = None,
) -> None:
    """Write a patient's $everything Bundle (audited as an export)."""
    from medcollab.records.cli import export_command  # noqa: PLC0415

    with _runtime() as runtime:
        export_command(runtime, patient, out_file, out)


access_app = typer.Typer(help="Access decisions.", no_args_is_help=True)
app.add_typer(access_app, name="access")


@access_app.command("explain")
def access_explain(
    user: Annotated[str, typer.Option(help="Username or user id.")],
    action: Annotated[str, typer.Option(help="read, search, create, update, delete, ...")],
    resource_type: Annotated[str, typer.Option("--type", help="FHIR resource type.")],
    patient: Annotated[str | None, typer.Option(help="FHIR Patient id.")] = None,
    org: Annotated[str | None, typer.Option(help="Organisation the user acts for.")] = None,
    purpose: Annotated[str | None, typer.Option(help="PurposeOfUse code, e.g. TREAT.")] = None,
) -> None:
    """Print the access decision for a user, patient, action and type, and why."""
    from medcollab.access.explain import explain  # noqa: PLC0415
    from medcollab.access.policy import Action, Purpose  # noqa: PLC0415

    try:
        chosen_action = Action(action.strip().lower())
    except ValueError:
        valid = ", ".join(a.value for a in Action)
        raise InvalidInput(f"unknown action {action!r}; actions are {valid}") from None
    try:
        chosen_purpose = Purpose(purpose.strip().upper()) if purpose else None
    except ValueError:
        valid = ", ".join(p.value for p in Purpose)
        raise InvalidInput(f"unknown purpose {purpose!r}; purposes are {valid}") from None
    with _runtime() as runtime, runtime.database.unit_of_work() as session:
        service = UserService(session=session, runtime=runtime)
        result = explain(
            session,
            runtime,
            user_id=_user_id(service, user),
            patient_id=patient,
            action=chosen_action,
            resource_type=resource_type,
            org_code=org,
            purpose=chosen_purpose,
            agent=operator_agent(),
        )
        verdict = "PERMIT" if result.decision.permitted else "DENY"
        out.print(
            f"{verdict}  {chosen_action.value} {resource_type}"
            f"{' of Patient/' + patient if patient else ''} as {result.org_code} "
            f"for {result.purpose.value}",
            markup=False,
            soft_wrap=True,
        )
        for reason in result.decision.reasons:
            out.print(f"  - {reason}", markup=False, soft_wrap=True)


def _register_subcommands() -> None:
    from medcollab.audit.cli import audit_app  # noqa: PLC0415
    from medcollab.keys.cli import keys_app  # noqa: PLC0415

    app.add_typer(keys_app, name="keys")
    app.add_typer(audit_app, name="audit")


_register_subcommands()


def main(argv: list[str] | None = None) -> int:  # noqa: PLR0911 - one exit per failure kind.
    """Entry point: runs the Typer app and turns every failure into a one-line diagnosis."""
    # Everything this process creates (database, keys, certificates, exports) is private to the
    # service account.
    os.umask(0o077)
    try:
        result = app(args=argv, standalone_mode=False)
        if isinstance(result, int) and result:
            # Without standalone mode, click returns the code of a typer.Exit instead of raising.
            return result
    except MedcollabError as exc:
        err.print(f"error: {exc.diagnostics()}", markup=False, highlight=False)
        return EXIT_ERROR
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        return EXIT_UNEXPECTED
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks.
        import click  # noqa: PLC0415

        # Typer vendors its own copy of click: its usage errors derive from TyperException, not
        # from click.ClickException.
        if isinstance(exc, click.ClickException | typer.TyperException):
            message = exc.format_message()
            if message:  # Empty when no command was given: the help has been printed instead.
                err.print(f"error: {message}", markup=False, highlight=False)
            return EXIT_ERROR
        err.print(
            f"error: unexpected {type(exc).__name__}; the failed step was rolled back "
            "(set MEDCOLLAB_LOG_LEVEL=DEBUG to see where it happened)",
            markup=False,
        )
        if os.environ.get("MEDCOLLAB_LOG_LEVEL", "").upper() == "DEBUG":
            # Frames only: an exception's text may quote SQL parameters or personal data.
            err.print("".join(traceback.format_tb(exc.__traceback__)), markup=False)
        return EXIT_UNEXPECTED
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
