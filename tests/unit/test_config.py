"""Settings: where values come from, what is refused, and what production refuses to serve with."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from medcollab.config import MIN_SECRET_LENGTH, Mode, Settings
from medcollab.deployment import initialise
from medcollab.errors import ConfigurationError

STRONG_SECRET = secrets.token_urlsafe(48)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No MEDCOLLAB_* variable a developer exported, no ./medcollab.toml: only what a test sets.

    Returns the path MEDCOLLAB_CONFIG points to; the file does not exist until a test writes it.
    """
    for name in list(os.environ):
        if name.startswith("MEDCOLLAB_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    config_file = tmp_path / "conf" / "medcollab.toml"
    config_file.parent.mkdir()
    monkeypatch.setenv("MEDCOLLAB_CONFIG", str(config_file))
    return config_file


def _production(tmp_path: Path, **values: object) -> Settings:
    """A production deployment that is safe to serve unless ``values`` say otherwise."""
    base: dict[str, object] = {"data_dir": tmp_path / "data", "secret_key": STRONG_SECRET}
    return Settings(**{**base, **values})


def _refusal(settings: Settings) -> str:
    with pytest.raises(ConfigurationError) as caught:
        settings.check_safe_to_serve()
    return caught.value.diagnostics()


# Sources ------------------------------------------------------------------------------------------


def test_defaults_are_a_production_deployment() -> None:
    settings = Settings()

    assert settings.mode is Mode.PRODUCTION
    assert settings.relaxed is False
    assert settings.tls is True
    assert settings.debug is False
    assert (settings.host, settings.port) == ("127.0.0.1", 8443)
    assert settings.data_dir == Path("var")
    assert settings.sqlalchemy_url == f"sqlite:///{Path('var/medcollab.db').resolve()}"


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDCOLLAB_MODE", "demo")
    monkeypatch.setenv("MEDCOLLAB_PORT", "9443")
    monkeypatch.setenv("MEDCOLLAB_DEBUG", "true")
    monkeypatch.setenv("MEDCOLLAB_DATA_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("MEDCOLLAB_TRUSTED_PROXIES", '["10.0.0.1", "10.0.0.2"]')
    monkeypatch.setenv("MEDCOLLAB_SECRET_KEY", STRONG_SECRET)

    settings = Settings()

    assert settings.mode is Mode.DEMO
    assert settings.port == 9443
    assert settings.debug is True
    assert settings.data_dir == tmp_path / "elsewhere"
    assert settings.trusted_proxies == ("10.0.0.1", "10.0.0.2")
    assert settings.secret_key.get_secret_value() == STRONG_SECRET


def test_toml_file_is_read_and_the_environment_wins_over_it(
    clean_environment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean_environment.write_text(
        'port = 9000\nhost = "192.0.2.10"\nlog_level = "WARNING"\njurisdiction = "GDPR"\n',
        encoding="utf-8",
    )
    from_file = Settings()
    assert (from_file.port, from_file.host, from_file.log_level) == (9000, "192.0.2.10", "WARNING")
    assert from_file.jurisdiction == "GDPR"

    monkeypatch.setenv("MEDCOLLAB_PORT", "9100")
    monkeypatch.setenv("MEDCOLLAB_LOG_LEVEL", "ERROR")
    layered = Settings()
    # Environment over file, file over defaults, for each value on its own.
    assert (layered.port, layered.log_level) == (9100, "ERROR")
    assert layered.host == "192.0.2.10"
    # Keyword arguments (the CLI's demo mode, the tests) win over both.
    assert Settings(port=9200).port == 9200


def test_default_toml_file_is_medcollab_toml_in_the_working_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MEDCOLLAB_CONFIG")
    (tmp_path / "medcollab.toml").write_text("port = 9001\n", encoding="utf-8")

    assert Settings().port == 9001


def test_missing_toml_file_means_defaults(clean_environment: Path) -> None:
    assert not clean_environment.exists()
    assert Settings().port == 8443


def test_unknown_key_in_the_toml_file_is_refused(clean_environment: Path) -> None:
    clean_environment.write_text("port = 9000\nsecret_kee = 'typo'\n", encoding="utf-8")

    with pytest.raises(ValidationError) as caught:
        Settings()
    errors = caught.value.errors()
    assert [(e["loc"], e["type"]) for e in errors] == [(("secret_kee",), "extra_forbidden")]


def test_unknown_keyword_is_refused() -> None:
    with pytest.raises(ValidationError, match="extra_forbidden"):
        Settings(tls_enabled=False)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MEDCOLLAB_PORT", "abc"),
        ("MEDCOLLAB_PORT", "0"),
        ("MEDCOLLAB_PORT", "65536"),
        ("MEDCOLLAB_MODE", "staging"),
        ("MEDCOLLAB_LOG_LEVEL", "TRACE"),
        ("MEDCOLLAB_KEY_PROVIDER", "vault"),
        ("MEDCOLLAB_TOTP_ISSUER", "med:collab"),
        ("MEDCOLLAB_LOCKOUT_THRESHOLD", "1"),
        ("MEDCOLLAB_MAX_BODY_BYTES", "10"),
    ],
)
def test_invalid_values_are_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    field = variable.removeprefix("MEDCOLLAB_").lower()

    with pytest.raises(ValidationError) as caught:
        Settings()
    assert [e["loc"] for e in caught.value.errors()] == [(field,)]


def test_settings_are_immutable() -> None:
    settings = Settings()
    with pytest.raises(ValidationError, match="frozen"):
        settings.debug = True


# Secrets ------------------------------------------------------------------------------------------


def test_secrets_never_appear_in_repr_str_or_dumps(monkeypatch: pytest.MonkeyPatch) -> None:
    secret, pin, password = STRONG_SECRET, "839201-hsm-pin", "db-password-0f3c9"
    monkeypatch.setenv("MEDCOLLAB_SECRET_KEY", secret)
    monkeypatch.setenv("MEDCOLLAB_DATABASE_URL", f"postgresql://medcollab:{password}@db/medcollab")
    settings = Settings(pkcs11_pin=pin)

    renderings = [
        repr(settings),
        str(settings),
        f"{settings}",
        str(settings.model_dump()),
        settings.model_dump_json(),
        repr(settings.secret_key),
        str(settings.database_url),
    ]
    for text in renderings:
        for value in (secret, pin, password):
            assert value not in text
    assert "**********" in repr(settings)
    # The values are still there for the code that needs them.
    assert settings.secret_key.get_secret_value() == secret
    assert password in settings.sqlalchemy_url


def test_secret_is_read_from_secret_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "app.secret"
    key_file.write_text(f"  {STRONG_SECRET}\n", encoding="utf-8")
    settings = Settings(data_dir=tmp_path / "data", secret_key_file=key_file)

    assert settings.resolved_secret_key_file == key_file
    assert settings.app_secret() == STRONG_SECRET.encode()
    settings.check_safe_to_serve()


def test_secret_key_setting_wins_over_the_file(tmp_path: Path) -> None:
    key_file = tmp_path / "app.secret"
    key_file.write_text("from-the-file-" + "x" * 40, encoding="utf-8")

    settings = Settings(secret_key=STRONG_SECRET, secret_key_file=key_file)

    assert settings.app_secret() == STRONG_SECRET.encode()


def test_missing_secret_names_init_and_the_variable(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")

    with pytest.raises(ConfigurationError) as caught:
        settings.app_secret()
    message = caught.value.diagnostics()
    assert str(tmp_path / "data" / "keys" / "app.secret") in message
    assert "medcollab init" in message
    assert "MEDCOLLAB_SECRET_KEY" in message
    assert "medcollab init" in _refusal(settings)


@pytest.mark.parametrize("mode", list(Mode))
def test_a_secret_too_short_to_derive_keys_from_is_refused_in_every_mode(
    tmp_path: Path, mode: Mode
) -> None:
    key_file = tmp_path / "app.secret"
    key_file.write_text("fifteen-chars!!\n", encoding="utf-8")

    for settings in (
        Settings(mode=mode, secret_key="change-me"),
        Settings(mode=mode, secret_key_file=key_file),
    ):
        with pytest.raises(ConfigurationError) as caught:
            settings.app_secret()
        message = caught.value.diagnostics()
        assert "shorter than 16 bytes" in message
        assert "MEDCOLLAB_SECRET_KEY" in message
        assert "change-me" not in message
        assert "fifteen" not in message


def test_initialise_generates_a_private_secret_that_serves(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")

    report = initialise(settings)

    key_file = tmp_path / "data" / "keys" / "app.secret"
    assert report.secret_created is True
    assert settings.resolved_secret_key_file == key_file
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    secret = settings.app_secret()
    assert secret == key_file.read_text(encoding="utf-8").strip().encode()
    assert len(secret) >= MIN_SECRET_LENGTH
    settings.check_safe_to_serve()
    # A second initialisation keeps the secret: rotating it would orphan every session and HMAC.
    assert initialise(settings).secret_created is False
    assert settings.app_secret() == secret


def test_initialise_refuses_a_secret_file_others_can_read(tmp_path: Path) -> None:
    key_file = tmp_path / "data" / "keys" / "app.secret"
    key_file.parent.mkdir(parents=True)
    key_file.write_text(STRONG_SECRET, encoding="utf-8")
    key_file.chmod(0o644)

    with pytest.raises(ConfigurationError) as caught:
        initialise(Settings(data_dir=tmp_path / "data"))
    assert "readable by other users (mode 644)" in caught.value.diagnostics()
    assert f"chmod 600 {key_file}" in caught.value.diagnostics()


# Safe to serve ------------------------------------------------------------------------------------


def test_a_complete_production_configuration_serves(tmp_path: Path) -> None:
    _production(tmp_path).check_safe_to_serve()


@pytest.mark.parametrize(
    "secret",
    [
        "change-me",
        "CHANGE-ME",
        "changeme",
        " secret ",
        "password",
        "placeholder",
        "short-but-random-8f3a9",  # 22 characters.
        "x" * (MIN_SECRET_LENGTH - 1),
    ],
)
def test_production_refuses_a_placeholder_or_short_secret(tmp_path: Path, secret: str) -> None:
    message = _refusal(_production(tmp_path, secret_key=secret))

    assert "placeholder or shorter than 32 characters" in message
    assert "set MEDCOLLAB_SECRET_KEY" in message
    if len(secret) > 15:
        assert secret not in message  # The refusal never repeats the secret it refuses.


def test_production_refuses_a_placeholder_in_the_secret_file(tmp_path: Path) -> None:
    key_file = tmp_path / "app.secret"
    key_file.write_text("change-me\n", encoding="utf-8")

    message = _refusal(_production(tmp_path, secret_key="", secret_key_file=key_file))

    assert "MEDCOLLAB_SECRET_KEY" in message


def test_production_refuses_plain_http(tmp_path: Path) -> None:
    message = _refusal(_production(tmp_path, tls=False))

    assert "TLS is off" in message
    assert "MEDCOLLAB_TLS=true" in message
    assert "MEDCOLLAB_TLS_CERT_FILE" in message


def test_production_refuses_debug(tmp_path: Path) -> None:
    assert "MEDCOLLAB_DEBUG=false" in _refusal(_production(tmp_path, debug=True))


def test_every_problem_is_named_at_once(tmp_path: Path) -> None:
    message = _refusal(_production(tmp_path, secret_key="change-me", tls=False, debug=True))

    assert message.startswith("refusing to start in production mode: ")
    for fix in ("MEDCOLLAB_SECRET_KEY", "MEDCOLLAB_TLS=true", "MEDCOLLAB_DEBUG=false"):
        assert fix in message
    assert message.count("; ") >= 2
    # The way out for a developer, and the warning that it is only for one.
    assert "MEDCOLLAB_MODE=dev only on a development machine" in message


def test_refusal_comes_from_environment_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDCOLLAB_SECRET_KEY", "change-me")
    monkeypatch.setenv("MEDCOLLAB_TLS", "false")

    message = _refusal(Settings())

    assert "MEDCOLLAB_SECRET_KEY" in message
    assert "MEDCOLLAB_TLS=true" in message


@pytest.mark.parametrize("mode", [Mode.DEV, Mode.DEMO])
def test_dev_and_demo_modes_are_relaxed(tmp_path: Path, mode: Mode) -> None:
    settings = Settings(
        mode=mode,
        data_dir=tmp_path / "no-such-dir",
        secret_key="change-me",
        tls=False,
        debug=True,
        key_provider="pkcs11",
    )

    assert settings.relaxed is True
    settings.check_safe_to_serve()


def test_relaxed_modes_relax_nothing_but_the_serving_checks() -> None:
    with pytest.raises(ValidationError):
        Settings(mode=Mode.DEMO, port=0)
    assert Settings(mode=Mode.DEMO).tls is True


# Key providers ------------------------------------------------------------------------------------


def test_pkcs11_without_module_or_pin_is_refused(tmp_path: Path) -> None:
    message = _refusal(_production(tmp_path, key_provider="pkcs11"))

    assert "MEDCOLLAB_PKCS11_MODULE must name the HSM's PKCS#11 library" in message
    assert "MEDCOLLAB_PKCS11_PIN is empty or a placeholder" in message


@pytest.mark.parametrize("pin", ["1234", "0000", "123456", "change-me", " "])
def test_pkcs11_with_a_default_pin_is_refused(tmp_path: Path, pin: str) -> None:
    settings = _production(
        tmp_path, key_provider="pkcs11", pkcs11_module=tmp_path / "libsofthsm2.so", pkcs11_pin=pin
    )

    message = _refusal(settings)

    assert "MEDCOLLAB_PKCS11_PIN" in message
    assert "MEDCOLLAB_PKCS11_MODULE" not in message


def test_pkcs11_with_module_and_pin_serves(tmp_path: Path) -> None:
    _production(
        tmp_path,
        key_provider="pkcs11",
        pkcs11_module=tmp_path / "libsofthsm2.so",
        pkcs11_pin="7c1e-52aa-90f3",
    ).check_safe_to_serve()


# Derived locations --------------------------------------------------------------------------------


def test_locations_derive_from_the_data_directory(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)

    assert settings.key_dir == tmp_path / "keys"
    assert settings.resolved_secret_key_file == tmp_path / "keys" / "app.secret"
    assert settings.resolved_tls_cert_file == tmp_path / "tls" / "cert.pem"
    assert settings.resolved_tls_key_file == tmp_path / "tls" / "key.pem"
    assert settings.sqlalchemy_url == f"sqlite:///{tmp_path.resolve() / 'medcollab.db'}"


def test_configured_locations_win(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        database_url="postgresql://medcollab@db/medcollab",
        tls_cert_file=tmp_path / "real" / "cert.pem",
        tls_key_file=tmp_path / "real" / "key.pem",
    )

    assert settings.sqlalchemy_url == "postgresql://medcollab@db/medcollab"
    assert settings.resolved_tls_cert_file == tmp_path / "real" / "cert.pem"
    assert settings.resolved_tls_key_file == tmp_path / "real" / "key.pem"


def test_unsafe_audit_switch_is_refused_outside_dev(tmp_path: Path) -> None:
    """The benchmark-only switch that skips record-access audit events never serves production."""
    settings = Settings(
        mode="production", secret_key="p" * 48, data_dir=tmp_path, unsafe_disable_audit=True
    )
    with pytest.raises(ConfigurationError, match="MEDCOLLAB_UNSAFE_DISABLE_AUDIT"):
        settings.check_safe_to_serve()
